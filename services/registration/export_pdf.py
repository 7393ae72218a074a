"""The data export as a readable PDF in Japanese (fpdf2, IPAexGothic served from the repository).

Pure rendering of the archive ``exports.archive`` builds: one section per service, one block per
table, each row as ``項目: 値`` lines. Rendering parses the font, so the route runs it in a thread.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fpdf import FPDF

import shared.fonts

FONT_PATH = Path(shared.fonts.__file__).parent / "ipaexg.ttf"
FONT = "IPAexGothic"
TITLE = "保有個人データの開示（データエクスポート）"

#: What each service is, in the resident's words.
SERVICE_NAMES = {
    "registration": "ふるさと住民登録（登録・同意）",
    "certification": "二地域居住者の証明（申請・証明書）",
    "subsidy": "交通支援（助成・利用実績）",
    "donation": "ふるさと納税（寄附・受領証明書）",
    "notification": "お知らせ（メッセージ・メール）",
    "partner_gateway": "提携事業者への提供（提供記録）",
    "listings": "地域の情報（関心・連絡先の提供記録）",
}
_MAX_VALUE = 300


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= _MAX_VALUE else text[:_MAX_VALUE] + "…"


def render_export(archive: dict[str, Any]) -> bytes:
    pdf = FPDF(orientation="P", unit="mm", format="A4")
    pdf.set_title(TITLE)
    pdf.set_creator("Nichiiki registration service")
    pdf.set_lang("ja")
    pdf.add_font(FONT, "", str(FONT_PATH))
    pdf.set_margins(15, 15, 15)
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_page()
    pdf.set_font(FONT, size=16)
    pdf.multi_cell(0, 10, TITLE, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font(FONT, size=9)
    pdf.multi_cell(
        0, 5,
        f"利用者ID: {archive['resident_id']}\n受付日時: {archive['requested_at']}\n作成日時: {archive['ready_at']}\n"
        "個人情報の保護に関する法律に基づき、本プラットフォームの各サービスが保有するあなたの個人データを"
        "開示します。提携事業者への提供の記録は「提携事業者への提供」の deliveries に記載されています。",
        new_x="LMARGIN", new_y="NEXT",
    )
    for service, tables in archive["services"].items():
        pdf.ln(4)
        pdf.set_font(FONT, size=13)
        pdf.multi_cell(0, 8, f"■ {SERVICE_NAMES.get(service, service)}", new_x="LMARGIN", new_y="NEXT")
        for table, rows in tables.items():
            pdf.set_font(FONT, size=10)
            pdf.multi_cell(0, 6, f"{table}（{len(rows)}件）", new_x="LMARGIN", new_y="NEXT")
            pdf.set_font(FONT, size=8)
            for row in rows:
                lines = [f"  {key}: {_value(value)}" for key, value in row.items() if value is not None]
                pdf.multi_cell(0, 4, "\n".join(lines) or "  （項目なし）", new_x="LMARGIN", new_y="NEXT")
                pdf.ln(1)
    return bytes(pdf.output())
