"""Alerts to operators by e-mail (SMTP) and/or webhook (JSON POST). No Dagster here.

Configured from the environment (see README, "Alerts"); a channel without configuration is
skipped. Delivery failures are collected and raised together after every channel was tried, so
one broken channel never silences the other.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from typing import Any

from rag_backup.errors import RagBackupError

SEND_TIMEOUT_S = 20


@dataclass(frozen=True)
class Alert:
    """One thing an operator must know: what happened, where, and the details."""

    kind: str  # backup_failed | run_failed | rpo_breached | rpo_recovered | rpo_check_failed |
    #            backup_damaged
    title: str
    text: str
    store: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)

    def subject(self) -> str:
        return f"[rag-backup] {self.title}"

    def body(self) -> str:
        lines = [self.text, ""]
        lines += [f"{key}: {value}" for key, value in self.details.items()]
        return "\n".join(lines).rstrip() + "\n"

    def payload(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["details"] = dict(self.details)
        doc["source"] = "rag-backup"
        return doc


class AlertDeliveryError(RagBackupError):
    """At least one configured channel could not deliver an alert."""


@dataclass(frozen=True)
class SmtpChannel:
    host: str
    port: int
    sender: str
    recipients: tuple[str, ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    starttls: bool = False

    def send(self, alert: Alert) -> None:
        message = EmailMessage()
        message["Subject"] = alert.subject()
        message["From"] = self.sender
        message["To"] = ", ".join(self.recipients)
        message.set_content(alert.body())
        with smtplib.SMTP(self.host, self.port, timeout=SEND_TIMEOUT_S) as smtp:
            if self.starttls:
                smtp.starttls(context=ssl.create_default_context())
            if self.username:
                smtp.login(self.username, self.password or "")
            smtp.send_message(message)


@dataclass(frozen=True)
class WebhookChannel:
    url: str = field(repr=False)  # may carry a token
    bearer_token: str | None = field(default=None, repr=False)

    def send(self, alert: Alert) -> None:
        headers = {"Content-Type": "application/json", "User-Agent": "rag-backup"}
        if self.bearer_token:
            headers["Authorization"] = f"Bearer {self.bearer_token}"
        request = urllib.request.Request(self.url, data=json.dumps(alert.payload()).encode(),
                                         headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=SEND_TIMEOUT_S) as response:
            if response.status >= 300:
                raise AlertDeliveryError(f"webhook answered HTTP {response.status}")


@dataclass(frozen=True)
class Notifier:
    smtp: SmtpChannel | None = None
    webhook: WebhookChannel | None = None

    @property
    def channels(self) -> list[SmtpChannel | WebhookChannel]:
        return [c for c in (self.smtp, self.webhook) if c is not None]

    def send(self, alert: Alert) -> int:
        """Deliver on every configured channel; return how many delivered."""
        errors = []
        for channel in self.channels:
            name = "e-mail" if isinstance(channel, SmtpChannel) else "webhook"
            try:
                channel.send(alert)
            except (OSError, smtplib.SMTPException, urllib.error.URLError,
                    AlertDeliveryError) as exc:
                errors.append(f"{name}: {exc}")
        if errors:
            raise AlertDeliveryError(f"alert '{alert.title}' not delivered by "
                                     f"{'; '.join(errors)}")
        return len(self.channels)
