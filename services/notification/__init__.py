"""Notification: residents hear about every decision that concerns them, once, in their language.

Owns the resident contact projection (name, address, language, e-mail consent; built from
``registration.residents.v1``), the in-app inbox and the e-mail queue and delivery log. Consumes
registration, application, certificate, grant and donation events and publishes what was sent on
``notification.deliveries.v1`` (never a message body).

Japanese terms, with the English names used in code: ふるさと住民登録 furusato resident
registration (ベーシック basic / プレミアム premium), 二地域居住者証明書 dual-resident certificate,
寄附金受領証明書 donation receipt, ワンストップ特例 one-stop exception, 確定申告 tax return,
西暦 Gregorian calendar (the date style of every Japanese message).
"""
