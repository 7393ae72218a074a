"""Subsidy: travel programs, their budgets (yen and miles) with a ledger, grants and redemptions.

Owns the travel-support side of 二地域居住 (dual residence): when a municipality certifies a
dual resident (二地域居住者の証明, a *certificate*), the resident gets a *grant* under every active
program of that municipality whose partner they consented to — JAL's mileage grant, ANA's and the
ferries' fare discounts, JR East's fare vouchers — reserved on the program's *budget*, or
waitlisted when the budget cannot cover it. Donations earmarked for dual residence (ふるさと納税,
hometown-tax donations, and mile donations) and staff top-ups raise budgets and issue waitlisted
grants in arrival order. Partners report *trips*; accepted ones draw on the grant, refused ones
are answered with a reason. Every budget movement is a row of the *ledger*.
"""
