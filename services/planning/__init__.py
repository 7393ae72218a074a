"""Planning: the act's three pillars besides the residents — plans, support corporations, councils.

Prefectures adopt 広域的地域活性化基盤整備計画 (with a 特定居住 section) and municipalities inside them
特定居住促進計画; mayors designate and supervise 特定居住支援法人, which may propose that a plan be
made or changed; municipalities organise 特定居住促進協議会 to consult on their plans.

Owns: plans and their versions, support corporations and their supervision reports, proposals,
councils with members and meetings. Seeded from ``shared/reference`` (the 20 prefectural and 28
municipal plans and the 51 designations of MLIT's list). No personal data leaves it.
"""
