"""The real Milvus 2.3.5 standalone server from the ``milvus`` pip package, on ports we choose.

The package ships the server binary and its libraries as ``.lzma`` files plus a configuration
template. We do not use its ``MilvusServer`` wrapper (it searches ports upwards from fixed
numbers and starts the embedded etcd on 2379/2380); instead:

- the binaries are unpacked once into a cache shared by every stack (``<cache>/milvus-<version>``,
  under a file lock, atomically renamed into place);
- ``<root>/milvus/configs/milvus.yaml`` is rendered from the template with *every* port chosen by
  us, and ``etcd.config.path`` points the embedded etcd at ``configs/etcd.yaml`` with its client
  and peer URLs on 127.0.0.1 and our ports;
- the metrics/health HTTP port (9091 by default) comes from ``METRICS_PORT``.

Milvus 2.3 binds its gRPC ports on all interfaces whatever ``<role>.ip`` says (``ip`` only sets
the address it advertises, which we set to 127.0.0.1); only the embedded etcd can be kept on
loopback. The server is stopped by process group, SIGTERM then SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.util
import lzma
import os
import re
import shutil
import time
import urllib.request
from pathlib import Path

from rag_backup.devstack.base import Launch, Service, base_env
from rag_backup.devstack.procs import DevStackError, tail

HOST = "127.0.0.1"
PORT_NAMES = (
    "port",  # the proxy: gRPC and REST API, what clients use
    "etcd",
    "etcd_peer",
    "metrics",
    "root_coord",
    "proxy_internal",
    "query_coord",
    "query_node",
    "index_coord",
    "index_node",
    "data_coord",
    "data_node",
)
# template placeholder -> our port name
TEMPLATE_PORTS = {
    "etcd_port": "etcd",
    "root_coord_port": "root_coord",
    "proxy_port": "port",
    "proxy_internal_port": "proxy_internal",
    "query_coord_port": "query_coord",
    "query_node_port": "query_node",
    "index_coord_port": "index_coord",
    "index_node_port": "index_node",
    "data_coord_port": "data_coord",
    "data_node_port": "data_node",
}
PLACEHOLDER = re.compile(r"\{\{(.*?)\}\}")
GRACEFUL_STOP_S = 5
SESSION_TTL_S = 10
RELOAD_TIMEOUT_S = 120.0


def milvus_package_dir() -> Path:
    spec = importlib.util.find_spec("milvus")
    if spec is None or spec.origin is None:
        raise DevStackError(
            "milvus: the `milvus` package (2.3.x, the embedded server) is not installed; pip install 'milvus==2.3.5'"
        )
    data = Path(spec.origin).parent / "data"
    if not (data / "bin" / "milvus.lzma").exists():
        raise DevStackError(
            f"milvus: {data}/bin/milvus.lzma not found; is the installed `milvus` package the server (2.3.x)?"
        )
    return data


def default_cache_dir() -> Path:
    override = os.environ.get("RAG_DEVSTACK_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rag-backup"


def unpack_binaries(cache_dir: Path) -> Path:
    """Unpack the server binary and its libraries once; return the directory that holds them."""
    data = milvus_package_dir()
    version = importlib.metadata.version("milvus")
    sources = sorted((data / "bin").glob("*.lzma"))
    fingerprint = (
        version + ";" + ";".join(f"{p.name}:{p.stat().st_size}" for p in sources)
    )
    target = cache_dir / f"milvus-{version}"
    marker = target / ".complete"
    if marker.exists() and marker.read_text(encoding="utf-8") == fingerprint:
        return target / "bin"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f".milvus-{version}.lock", "w", encoding="utf-8") as lock:
        fcntl.flock(
            lock, fcntl.LOCK_EX
        )  # another process may be unpacking the same version
        if marker.exists() and marker.read_text(encoding="utf-8") == fingerprint:
            return target / "bin"
        staging = cache_dir / f".milvus-{version}.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "bin").mkdir(parents=True)
        for source in sources:
            out = staging / "bin" / source.name[: -len(".lzma")]
            with lzma.open(source) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            out.chmod(0o755)
        (staging / ".complete").write_text(fingerprint, encoding="utf-8")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(staging, target)
    return target / "bin"


def _replace_once(text: str, pattern: str, replacement: str, what: str) -> str:
    """Substitute the one line of the config template that ``pattern`` names, or fail."""
    text, count = re.subn(pattern, replacement, text, count=1, flags=re.MULTILINE)
    if count != 1:
        raise DevStackError(f"milvus: config template has no {what}")
    return text


def render_config(template: str, values: dict[str, str], etcd_config: Path) -> str:
    """Fill the package's ``{{ name(type): default }}`` placeholders and pin addresses to loopback."""

    def substitute(match: re.Match[str]) -> str:
        key = match.group(1).split(":", 1)[0].split("(", 1)[0].strip()
        if key not in values:
            raise DevStackError(
                f"milvus: config template placeholder {key!r} has no value"
            )
        return values[key]

    text = PLACEHOLDER.sub(substitute, template)
    text = text.replace("localhost:", f"{HOST}:")
    # Every role advertises 127.0.0.1 instead of "the first unicastable address".
    text = re.sub(r"^(  ip:).*$", rf"\1 {HOST}", text, flags=re.MULTILINE)
    # The embedded etcd reads its listen URLs from this file (otherwise it takes 2379/2380).
    text = _replace_once(text, r"^etcd:\n", f"etcd:\n  config:\n    path: {etcd_config}\n",
                         "a top-level `etcd:` section")
    # On SIGTERM, 2.3 stops its coordinators before its nodes, and the nodes then retry the
    # coordinators until this timeout (1800 s by default): let it force-quit itself quickly.
    text = _replace_once(text, r"^(  gracefulStopTimeout:) *\d+", rf"\g<1> {GRACEFUL_STOP_S}",
                         "common.gracefulStopTimeout")
    # That stop is never clean (2.3.5 panics once its embedded etcd is closed), so the stopped
    # nodes' sessions stay in etcd until their lease runs out, and the next start waits for them
    # before it reloads the collections: a shorter lease makes a restart wait less (30 s default).
    text = _replace_once(text, r"^(    ttl:) *\d+", rf"\g<1> {SESSION_TTL_S}",
                         "common.session.ttl")
    return text


class MilvusService(Service):
    name = "milvus"
    port_names = PORT_NAMES
    startup_timeout_s = 180.0
    stop_grace_s = 20.0

    def __init__(self, root: Path, state, cache_dir: Path | None = None) -> None:
        super().__init__(root, state)
        self.cache_dir = cache_dir or default_cache_dir()
        self.config_dir = self.dir / "configs"
        self.data_dir = self.dir / "data"
        self.bin_dir: Path | None = None

    def prepare(self) -> None:
        for directory in (
            self.config_dir,
            self.data_dir,
            self.dir / "logs",
            self.dir / "run",
        ):
            directory.mkdir(parents=True, exist_ok=True)
        self.bin_dir = unpack_binaries(self.cache_dir)

    def configure(self, ports: dict[str, int]) -> None:
        package = milvus_package_dir()
        template = (package / "config.yaml.template").read_text(encoding="utf-8")
        etcd_config = self.config_dir / "etcd.yaml"
        values = {key: str(ports[name]) for key, name in TEMPLATE_PORTS.items()}
        values.update(
            etcd_log_level="warn",
            etcd_log_path=str(self.dir / "logs" / "etcd.log"),
            etcd_data_dir=str(self.data_dir / "etcd.data"),
            local_storage_dir=str(self.data_dir),
            rocksmq_data_dir=str(self.data_dir / "rocksmq"),
            system_log_path="",  # no log files of its own: stdout goes to <root>/logs/milvus.log
            server_pem_path="server.pem",
            server_key_path="server.key",
            ca_pem_path="ca.pem",
            authorization_enabled="false",
            tls_mode="0",
        )
        (self.config_dir / "milvus.yaml").write_text(
            render_config(template, values, etcd_config), encoding="utf-8"
        )
        client_url = f"http://{HOST}:{ports['etcd']}"
        peer_url = f"http://{HOST}:{ports['etcd_peer']}"
        etcd_config.write_text(
            "# Written by rag_backup.devstack: the embedded etcd, on loopback and our ports.\n"
            "name: default\n"
            f"data-dir: {self.data_dir / 'etcd.data'}\n"
            f"listen-client-urls: {client_url}\n"
            f"advertise-client-urls: {client_url}\n"
            f"listen-peer-urls: {peer_url}\n"
            f"initial-advertise-peer-urls: {peer_url}\n"
            f"initial-cluster: default={peer_url}\n",
            encoding="utf-8",
        )
        shutil.copy(package / "glog.conf", self.config_dir / "glog.conf")

    def launch(self) -> Launch:
        if self.bin_dir is None:
            self.bin_dir = unpack_binaries(self.cache_dir)
        env = base_env()
        env.update(
            DEPLOY_MODE="STANDALONE",
            METRICS_PORT=str(self.ports["metrics"]),
            MILVUS_RUN_DIR=str(self.dir / "run"),
            LD_LIBRARY_PATH=str(self.bin_dir),
        )
        # Milvus reads ./configs/milvus.yaml relative to its working directory.
        return Launch(
            argv=[str(self.bin_dir / "milvus"), "run", "standalone"],
            env=env,
            cwd=self.dir,
        )

    @property
    def uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def probe(self) -> bool:
        url = f"http://{HOST}:{self.ports['metrics']}/healthz"
        with urllib.request.urlopen(url, timeout=2) as response:
            return b"OK" in response.read()

    def after_start(self) -> None:
        """Wait until the proxy serves requests and every loaded collection is loaded again.

        The health endpoint can say OK a moment before the proxy answers, and after a restart the
        collections that were loaded come back as "Loading" for a few seconds: a search or query
        in that window fails with "collection not loaded".
        """
        from pymilvus import MilvusClient

        client = MilvusClient(uri=self.uri, token="", timeout=30)
        try:
            deadline = time.monotonic() + RELOAD_TIMEOUT_S
            while True:
                loading = [
                    name
                    for name in client.list_collections(timeout=30)
                    if _state_name(client.get_load_state(name, timeout=30)) == "Loading"
                ]
                if not loading:
                    return
                if time.monotonic() >= deadline:
                    raise DevStackError(
                        f"milvus: collections {loading} still loading after {RELOAD_TIMEOUT_S:.0f} s; "
                        f"last lines of {self.log_path}:\n{tail(self.log_path)}"
                    )
                time.sleep(0.5)
        finally:
            with contextlib.suppress(Exception):
                client.close()

    def env(self) -> dict[str, str]:
        # localStorage.path of this server: where its binlogs are, for auto_id restores that
        # keep their ids (Milvus's backup-mode bulk import reads them there).
        return {"RAG_MILVUS_URI": self.uri, "RAG_MILVUS_TOKEN": "",
                "RAG_MILVUS_STORAGE_ROOT": str(self.data_dir)}

    def describe(self) -> str:
        return f"port {self.port}, etcd {self.ports.get('etcd')}, metrics {self.ports.get('metrics')}"


def _state_name(load_state: dict[str, object]) -> str:
    state = load_state.get("state")
    return str(getattr(state, "name", state))
