"""Sending a weekly report by SMTP (aiosmtplib): the summary and page one inline, the PDF attached."""

from __future__ import annotations

import html
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import make_msgid

import aiosmtplib
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    username: str = ""
    password: str = ""
    starttls: bool = False  # STARTTLS after connecting (port 587)
    tls: bool = False  # implicit TLS (port 465)
    timeout: float = 30.0
    attempts: int = 3

    @property
    def enabled(self) -> bool:
        return bool(self.host and self.recipients)


def build_message(
    settings: SmtpSettings, week: str, summary: list[str], pdf: bytes, charts_png: bytes
) -> EmailMessage:
    message = EmailMessage()
    message["Subject"] = f"Cosnap weekly performance {week}"
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.recipients)
    text = "\n".join(f"- {line}" for line in summary)
    message.set_content(
        f"Cosnap weekly performance, {week}\n\n{text}\n\nThe full report is attached (PDF).\n"
    )
    cid = make_msgid(domain="cosnap.local")
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    message.add_alternative(
        f"<html><body style='font-family:sans-serif;color:#202124'>"
        f"<h2>Cosnap weekly performance, {html.escape(week)}</h2><ul>{items}</ul>"
        f"<img src='cid:{cid[1:-1]}' alt='Key figures and web vitals' style='max-width:100%'>"
        f"<p>The full report is attached (PDF).</p></body></html>",
        subtype="html",
    )
    parts = message.get_payload()
    assert isinstance(parts, list)
    html_part = parts[1]
    assert isinstance(html_part, EmailMessage)
    html_part.add_related(charts_png, maintype="image", subtype="png", cid=cid)
    message.add_attachment(pdf, maintype="application", subtype="pdf", filename=f"cosnap-weekly-{week}.pdf")
    return message


async def send(settings: SmtpSettings, message: EmailMessage) -> None:
    """Send with a few retries on connection and server errors; raises the last error."""
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(settings.attempts),
        wait=wait_exponential(multiplier=0.5, max=10),
        retry=retry_if_exception_type((aiosmtplib.SMTPException, OSError)),
        reraise=True,
    ):
        with attempt:
            await aiosmtplib.send(
                message,
                hostname=settings.host,
                port=settings.port,
                username=settings.username or None,
                password=settings.password or None,
                start_tls=settings.starttls,
                use_tls=settings.tls,
                timeout=settings.timeout,
            )
