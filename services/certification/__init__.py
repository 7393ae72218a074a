"""Certification: dual-resident applications, municipal review, certificates.

A person with a furusato resident registration (ふるさと住民登録) applies to a municipality that has
adopted a specific residence promotion plan (特定居住促進計画) to be certified as a dual resident
(二地域居住者の証明, "certificate" in code). The municipality's staff review the application and
approve it (a certificate numbered ``NCH-<code6>-<year>-<sequence>``) or reject it; certificates
are renewed, revoked, and expire, and each change is an event partners and subsidies act on.

Owns: municipality rules, applications, certificates, the staff audit trail, and a projection of
``registration.residents.v1`` (residents, their registrations, their share-certificate consents).
"""
