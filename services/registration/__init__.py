"""Registration: people, their furusato registrations with municipalities, and their consents.

ふるさと住民登録 (furusato resident registration): a person registers with one or more municipalities
(市区町村) and through each with its prefecture (都道府県). A registration is *basic* (ベーシック, active
at once) or *premium* (プレミアム: identity verified with the My Number Card's public-key certificate,
公的個人認証 / JPKI; at least three designated activities a year; at most three at a time; never the
municipality of the legal address, 住民票のある市区町村; reviewed by that municipality's staff and renewed
yearly). The service never stores a My Number (マイナンバー, individual number) and refuses any value
that looks like one. Every state change goes out on ``registration.residents.v1`` through the outbox.
"""
