"""The asset graph, rendered by the real Dagster UI in a real headless browser (Debian chromium)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from rag_backup_tests.dagster_procs import PROJECT, dagster_ui

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1600,1000", "--virtual-time-budget=30000",
]
SCREENSHOT = PROJECT / "docs" / "images" / "asset-graph.png"


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    assert binary, "chromium is not installed (scripts/setup.sh installs Debian's chromium)"
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, timeout=180, check=True)


def test_the_asset_graph_renders_the_backup_assets(stack_env, tmp_path):
    env = {**stack_env, "RAG_BACKUP_AUTOMATION": "off"}
    with dagster_ui(env, tmp_path / "dagster_home", daemon=False) as ui:
        page = f"{ui.url}/locations/rag_backup/asset-groups/postgres/lineage"
        dom = chromium(tmp_path / "profile", "--dump-dom", page).stdout.decode(errors="replace")
        for name in ("postgres_backup", "postgres_backup_verified", "postgres_retention"):
            assert f">{name}<" in dom, f"{name} is not rendered on {page}"
        shot = tmp_path / "asset-graph.png"
        chromium(tmp_path / "profile", f"--screenshot={shot}", page)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("RAG_BACKUP_UPDATE_SCREENSHOT"):
        shutil.copy(shot, SCREENSHOT)
