"""Partner gateway: what airlines, railways and ferries may see, and nothing more.

Owns the partners (JAL, ANA, JR East, Sado Kisen, Kyushu Yusen: their programs, municipalities,
credentials and pseudonym keys), the per-partner entitlements to dual-resident certificates
(二地域居住者の証明, "certificate"), the partner feeds ``partner.<code>.v1``, the on-demand
certificate verification (served from Redis, backed by PostgreSQL) and the record of every
provision of personal data to a partner (個人情報保護法 第29条 確認・記録義務, "delivery record",
APPI Art. 29). A certificate reaches a partner only with the resident's consent to share it
with that partner (本人の同意, "share consent"); residents appear only as a per-partner
pseudonym (仮名, "resident_ref").
"""
