"""The printable receipt (寄附金受領証明書): one A4 page in IPAexGothic, rendered with fpdf2.

Pure rendering: the caller passes everything the page shows. Rendering parses the font, so the
handler runs it in a worker thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path

from fpdf import FPDF

import shared.fonts

from .domain import japanese_date, yen

FONT_PATH = Path(shared.fonts.__file__).parent / "ipaexg.ttf"
FONT = "IPAexGothic"
TITLE = "寄附金受領証明書"


@dataclass(frozen=True, slots=True)
class ReceiptDocument:
    number: str
    donor_name: str
    donor_address: str
    donor_is_company: bool
    #: e.g. 和歌山県白浜町
    municipality_name: str
    #: e.g. 白浜町長
    issuer: str
    donation_date: date
    amount_jpy: int
    kind_label: str
    project: str | None
    issued_on: date
    reissue_count: int
    reissued_on: date | None
    #: The certified 地域再生計画 a corporate donation funds.
    plan_name: str | None = None
    #: A sentence the receipt must carry (a donation to a municipality that was not designated).
    note: str | None = None


def render_receipt(receipt: ReceiptDocument) -> bytes:
    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(f"{TITLE} {receipt.number}")
    pdf.set_author(receipt.issuer)
    pdf.set_creator("Nichiiki donation service")
    pdf.set_lang("ja")
    pdf.add_font(FONT, "", str(FONT_PATH))
    pdf.set_margins(20, 20, 20)
    pdf.set_auto_page_break(auto=False)
    pdf.add_page()

    pdf.set_font(FONT, size=10)
    pdf.cell(0, 6, f"証明書番号　{receipt.number}", align="R", new_x="LMARGIN", new_y="NEXT")
    if receipt.reissue_count:
        reissued = japanese_date(receipt.reissued_on) if receipt.reissued_on else ""
        pdf.cell(0, 6, f"再発行（{receipt.reissue_count}回目）{reissued}", align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(8)
    pdf.set_font(FONT, size=22)
    pdf.cell(0, 14, TITLE, align="C", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(10)

    pdf.set_font(FONT, size=14)
    honorific = "御中" if receipt.donor_is_company else "様"
    pdf.cell(0, 10, f"{receipt.donor_name}　{honorific}", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=11)
    pdf.multi_cell(0, 7, f"住所　{receipt.donor_address}", new_x="LMARGIN", new_y="NEXT")
    pdf.ln(8)

    rows = [
        ("寄附金額", yen(receipt.amount_jpy)),
        ("寄附年月日", japanese_date(receipt.donation_date)),
        ("寄附先", receipt.municipality_name),
        ("寄附の種類", receipt.kind_label),
    ]
    if receipt.plan_name:
        rows.append(("地域再生計画", receipt.plan_name))
    if receipt.project:
        rows.append(("事業名", receipt.project))
    label_width = 45
    for label, value in rows:
        pdf.set_font(FONT, size=12)
        pdf.cell(label_width, 12, label, border=1, align="C")
        pdf.set_font(FONT, size=16 if label == "寄附金額" else 12)
        pdf.cell(0, 12, f"  {value}", border=1, new_x="LMARGIN", new_y="NEXT")
    pdf.ln(12)

    pdf.set_font(FONT, size=12)
    pdf.multi_cell(0, 8, "上記の金額を寄附金として受領したことを証明します。", new_x="LMARGIN", new_y="NEXT")
    if receipt.note:
        pdf.ln(4)
        pdf.set_font(FONT, size=10)
        pdf.multi_cell(0, 6, f"※ {receipt.note}", new_x="LMARGIN", new_y="NEXT")
        pdf.set_font(FONT, size=12)
    pdf.ln(16)
    pdf.cell(0, 8, japanese_date(receipt.issued_on), align="R", new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=14)
    pdf.cell(0, 10, receipt.issuer, align="R", new_x="LMARGIN", new_y="NEXT")

    pdf.set_y(-30)
    pdf.set_font(FONT, size=8)
    pdf.multi_cell(
        0, 5,
        "この証明書は税の申告の際に寄附の証明として使用できます。大切に保管してください。"
        "再発行された証明書も同じ番号で、番号は再利用されません。",
        new_x="LMARGIN", new_y="NEXT",
    )
    return bytes(pdf.output())
