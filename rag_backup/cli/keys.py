"""``keys``: the repository's encryption keys: generate one, show what the repository is
encrypted to, rotate (rewrap every file's key for new recipients, payloads untouched)."""

from __future__ import annotations

import os
from datetime import datetime, timezone

import click

from rag_backup.cli import environment, output
from rag_backup.errors import InvalidRequest
from rag_backup.repository.crypto import Identity, Recipient, parse_recipients
from rag_backup.repository.sealed import ENV_IDENTITY, HEADER_SUFFIX


@click.group("keys")
def keys_group() -> None:
    """Encryption keys of the backup repository (age X25519)."""


@keys_group.command("generate")
@click.option("--output", "path", required=True, type=click.Path(dir_okay=False),
              help="Where to write the new identity (created with mode 0600, never "
                   "overwritten). Keep it away from the backups.")
def generate_command(path: str) -> None:
    """Create a new age identity; print its public key (for RAG_BACKUP_ENCRYPT_TO). The file
    is a standard age identity file (`age -d -i FILE` reads it)."""
    identity = Identity.generate()
    text = (f"# created: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
            f"# public key: {identity.recipient}\n{identity.encode()}\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise InvalidRequest(f"{path} exists: a key file is never overwritten") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    output.print_line(str(identity.recipient))


repository_option = click.option(
    "--repository", "which", type=click.Choice(["primary", "offsite"]), default="primary",
    show_default=True, help="The repository (RAG_BACKUP_REPOSITORY) or the offsite copy "
                            "(RAG_BACKUP_OFFSITE).")


def _open(which: str):
    repo = environment.repository() if which == "primary" else environment.offsite_repository()
    if repo is None:
        raise InvalidRequest("--repository offsite, but RAG_BACKUP_OFFSITE is not set")
    return repo


@keys_group.command("status")
@repository_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def status_command(which: str, as_json: bool) -> None:
    """What the repository encrypts to, and how many encrypted files each keyset holds."""
    from rag_backup.repository import crypto

    repo = _open(which)
    record = repo.sealed.key_record(fresh=True)
    counts: dict[str, int] = {}
    for info in repo.storage.list_files(""):
        if info.key.endswith(HEADER_SUFFIX):
            header = repo.storage.read_bytes(info.key)
            if header is not None:
                keyset = crypto.parse_header(header, info.key).keyset or "?"
                counts[keyset] = counts.get(keyset, 0) + 1
    doc = {"encrypted": record is not None,
           "recipients": record.recipients if record else [],
           "keyset": record.keyset if record else None,
           "since": record.since if record else None,
           "removed": record.removed if record else [],
           "files_by_keyset": counts}
    if as_json:
        output.print_json(doc)
        return
    output.print_table(output.key_values("encryption", [
        ("encrypted", "yes" if record else "no"),
        ("recipients", ", ".join(doc["recipients"]) or "-"),
        ("keyset", doc["keyset"] or "-"), ("since", doc["since"] or "-"),
        ("removed", ", ".join(r["recipient"] for r in doc["removed"]) or "-"),
        *((f"files for keyset {k}", n) for k, n in sorted(counts.items()))]))


@keys_group.command("rotate")
@click.option("--add", "add", multiple=True, metavar="AGE1...",
              help="A recipient to add (public key); repeatable.")
@click.option("--remove", "remove", multiple=True, metavar="AGE1...",
              help="A recipient to remove (public key); repeatable.")
@repository_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def rotate_command(add: tuple[str, ...], remove: tuple[str, ...], which: str,
                   as_json: bool) -> None:
    """Rewrap every encrypted file's key (headers only; no payload is rewritten) for the
    repository's recipients plus --add minus --remove, then verify. RAG_BACKUP_IDENTITY must
    open the current files (give the new key in it too, and the verification opens every file
    with it). Safe to re-run: what is rewrapped already is skipped. On an offsite bucket with
    Object Lock the new headers are new versions: the locked old ones keep opening with the
    removed key until their lock ends."""
    from rag_backup.repository.rotation import rotate

    if not add and not remove:
        raise InvalidRequest("give --add and/or --remove")
    repo = _open(which)
    if not repo.crypto.identities:
        raise InvalidRequest(f"{ENV_IDENTITY} is not set: rotation unwraps each file's key "
                             "with the current identity")
    recipients = [Recipient.parse(r) for r in add]
    removed = [r for text in remove for r in parse_recipients(text)]
    with output.progress_display():
        report = rotate(repo, add=recipients, remove=removed,
                        identities=repo.crypto.identities,
                        holder=environment.holder("key rotation"), log=output.log)
    if as_json:
        output.print_json(report.as_dict())
    else:
        output.print_table(output.key_values("key rotation", [
            (k, v) for k, v in report.as_dict().items() if k != "problems"]))
        for problem in report.problems[:20]:
            output.print_line(problem, "red")
    if not report.ok:
        raise click.exceptions.Exit(1)


__all__ = ["keys_group"]
