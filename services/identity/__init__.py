"""Identity: the platform's embedded OpenID Connect provider.

Signs people and systems in and issues the access tokens every service verifies (ES256 JWTs, the
claims of docs/identity.md): residents (self sign-up), municipal staff (password + TOTP),
prefecture and ministry readers, admins, partners' service accounts and the payment provider
(client credentials). Publishes its discovery document and JWKS; rotates its signing keys;
revokes sessions on sign-out (refresh tokens in its database, the session id in Redis).

Owns: accounts, OAuth clients, sign-in sessions and refresh tokens, failed sign-ins, signing keys.
A prefecture may replace it with its own provider (Keycloak, Entra ID): see docs/identity.md.
"""
