"""Donation service: donors, donations, receipts, the yearly one-stop counts and the fund ledger.

It owns hometown-tax donations (ふるさと納税, ``hometown_tax``), corporate donations (企業版ふるさと
納税, ``corporate``) and mile donations (``miles``) to municipalities; the donation receipt
(寄附金受領証明書, "receipt") with its gapless number per municipality and calendar year; the
one-stop exception (ワンストップ特例, "one-stop") per donor and calendar year; and each
municipality's fund ledger per earmark (general, or its dual-residence program). It consumes
nothing and publishes ``donation.donations.v1`` (keyed by municipality code).
"""
