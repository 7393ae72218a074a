"""Development credentials: the accounts and clients seeded when ``NICHIIKI_ENV=development``
(``./nichiiki start``, the demo, the tests), and nowhere else. Documented in docs/identity.md.

Never use these outside a development machine: they are in the source code.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.identity.domain import AccountRole, ClientRole, StaffRole

#: The TOTP secret of every seeded staff account (base32; add it to an authenticator app, or compute
#: codes with ``pyotp.TOTP(DEMO_TOTP_SECRET).now()``).
DEMO_TOTP_SECRET = "NICHIIKIDEMOSTAFFTOTPSECRET23456"

SHIRAHAMA = "304018"  # 和歌山県白浜町
TANABE = "302066"  # 和歌山県田辺市
WAKAYAMA_PREFECTURE = "300004"  # 和歌山県


@dataclass(frozen=True, slots=True)
class DevAccount:
    account_id: str
    email: str
    password: str
    role: AccountRole
    municipality: str | None = None
    staff_role: StaffRole | None = None
    prefecture: str | None = None
    #: Enrolled with DEMO_TOTP_SECRET (every staff account must be).
    totp: bool = False


@dataclass(frozen=True, slots=True)
class DevClient:
    client_id: str
    secret: str
    role: ClientRole
    partner: str | None = None


DEV_ACCOUNTS: tuple[DevAccount, ...] = (
    DevAccount("dev-admin", "admin@nichiiki.example", "nichiiki-dev-admin-pass", AccountRole.ADMIN),
    DevAccount(
        "dev-shirahama-reviewer", "reviewer@shirahama.example", "nichiiki-dev-reviewer-pass", AccountRole.STAFF,
        municipality=SHIRAHAMA, staff_role=StaffRole.REVIEWER, totp=True,
    ),
    DevAccount(
        "dev-shirahama-manager", "manager@shirahama.example", "nichiiki-dev-manager-pass", AccountRole.STAFF,
        municipality=SHIRAHAMA, staff_role=StaffRole.MANAGER, totp=True,
    ),
    DevAccount(
        "dev-shirahama-auditor", "auditor@shirahama.example", "nichiiki-dev-auditor-pass", AccountRole.STAFF,
        municipality=SHIRAHAMA, staff_role=StaffRole.AUDITOR, totp=True,
    ),
    DevAccount(
        "dev-tanabe-reviewer", "reviewer@tanabe.example", "nichiiki-dev-reviewer-pass", AccountRole.STAFF,
        municipality=TANABE, staff_role=StaffRole.REVIEWER, totp=True,
    ),
    DevAccount(
        "dev-wakayama-reader", "reader@pref.wakayama.example", "nichiiki-dev-prefecture-pass",
        AccountRole.PREFECTURE, prefecture=WAKAYAMA_PREFECTURE,
    ),
    DevAccount("dev-mlit-reader", "reader@mlit.example", "nichiiki-dev-ministry-pass", AccountRole.MINISTRY),
)

DEV_CLIENTS: tuple[DevClient, ...] = (
    *(
        DevClient(f"partner-{code}", f"nichiiki-dev-{code}-secret", ClientRole.PARTNER, partner=code)
        for code in ("jal", "ana", "jreast", "sadokisen", "kyushuyusen")
    ),
    DevClient("payment-provider", "nichiiki-dev-payment-secret", ClientRole.PAYMENT_PROVIDER),
)
