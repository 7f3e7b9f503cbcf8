"""Key rotation from the UI: ``rotate_keys_job`` rewraps every encrypted file's key in the
repository (and, if asked, the offsite copy) for the recipients after adding and removing
some, leaving every payload as it is; the work is ``rag_backup.repository.rotation``'s, the same
as ``rag-backup keys rotate``."""

from typing import Any

import dagster as dg
from pydantic import Field

from rag_backup.defs.common import run_holder
from rag_backup.defs.resources import BackupRepositoryResource
from rag_backup.errors import InvalidRequest
from rag_backup.repository.crypto import Recipient, parse_recipients
from rag_backup.repository.rotation import rotate


class RotateKeysConfig(dg.Config):
    add: list[str] = Field(default_factory=list, description="Age public keys (age1...) to "
                           "add as recipients of every backup.")
    remove: list[str] = Field(default_factory=list, description="Age public keys to remove: "
                              "no backup opens with them afterwards (old versions kept by an "
                              "offsite Object Lock excepted, until their lock ends).")
    repositories: list[str] = Field(default_factory=lambda: ["primary"], description="Which "
                                    "repositories to rotate: 'primary' and/or 'offsite'.")


@dg.op(out=dg.Out(dict), tags={"kind": "keys"})
def rotate_keys(context: dg.OpExecutionContext, config: RotateKeysConfig,
                repository: BackupRepositoryResource) -> dict:
    """Rewrap the per-file keys for the new recipients (RAG_BACKUP_IDENTITY must open the
    current files), then verify every header; fails if anything is left for an old keyset."""
    if not config.add and not config.remove:
        raise InvalidRequest("give keys to add and/or remove")
    unknown = set(config.repositories) - {"primary", "offsite"}
    if unknown or not config.repositories:
        raise InvalidRequest(f"repositories must be 'primary' and/or 'offsite', not "
                             f"{sorted(unknown) or 'none'}")
    add = [Recipient.parse(r) for r in config.add]
    remove = [r for text in config.remove for r in parse_recipients(text)]
    summary: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for which in config.repositories:
        repo = repository.open() if which == "primary" else repository.open_offsite()
        if repo is None:
            raise InvalidRequest("repositories names 'offsite' but RAG_BACKUP_OFFSITE is unset")
        if not repo.crypto.identities:
            raise InvalidRequest("RAG_BACKUP_IDENTITY is not set: rotation unwraps each file's "
                                 "key with the current identity")
        report = rotate(repo, add=add, remove=remove, identities=repo.crypto.identities,
                        holder=run_holder(context), log=context.log.info)
        summary[which] = report.as_dict()
        for name, value in report.as_dict().items():
            if isinstance(value, bool):
                metadata[f"{which}_{name}"] = dg.MetadataValue.bool(value)
            elif isinstance(value, int):
                metadata[f"{which}_{name}"] = dg.MetadataValue.int(value)
        metadata[f"{which}_keyset"] = dg.MetadataValue.text(report.keyset)
        if report.problems:
            metadata[f"{which}_problems"] = dg.MetadataValue.md(
                "\n".join(f"- {p}" for p in report.problems[:50]))
    context.add_output_metadata(metadata)
    failed = [w for w, r in summary.items() if not r["ok"]]
    if failed:
        raise dg.Failure(description=f"key rotation incomplete in {', '.join(failed)}: "
                         f"{summary[failed[0]]['problems'][0]}; run the job again",
                         metadata=metadata)
    return summary


@dg.job(tags={"kind": "keys"})
def rotate_keys_job():
    """Rotate the encryption keys: every file's key rewrapped, no payload rewritten;
    resumable (what is rewrapped already is skipped), verified at the end."""
    rotate_keys()


defs = dg.Definitions(jobs=[rotate_keys_job])
