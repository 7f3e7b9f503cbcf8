"""The production deployment, checked without a Docker engine (none runs on these machines).

- docker-compose.yml conforms to the Compose Specification's JSON schema (the copy vendored by
  the ``check-jsonschema`` package), before and after interpolation with a generated ``.env``;
  docker-compose 1.29 (Debian 12) accepts it too, when installed;
- every ``${VAR}`` is documented in .env.example, which holds no secret; every variable that
  rag_backup reads reaches the code server, the daemon and every run container (and the Helm
  values); every bind mount, build context, Dockerfile, COPY source and script exists;
- images are pinned, and the tool versions in the user-code image match the store images;
- Dagster's storage is its own PostgreSQL service (dagster-postgres), not the one backed up;
  RAG_DRILL_RULES_FILE is an optional file on a read-only volume;
- both dagster.yaml files pass Dagster's validation (which rejects a misplaced run monitoring
  key), run monitoring frees a dead run's pool slot within minutes, the Helm values carry the
  same monitoring, and the Docker one builds a real instance
  (DockerRunLauncher, Postgres storage) on a PostgreSQL 15 initialised by our init script, as
  the Dagster role that script creates; ``dagster instance migrate`` runs on it;
- both workspace.yaml files load; the user-code container's command serves the Definitions over
  gRPC with nothing but the container's environment;
- the Redis start script keeps the password off every command line; the MinIO bootstrap
  creates the buckets on a real S3 server (moto).

Needs no ``stack`` fixture: every server here is private to the test and takes seconds.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.resources
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKER = ROOT / "docker"
DOCKER_DAGSTER_YAML = DOCKER / "dagster" / "dagster.yaml"
DOCKER_WORKSPACE_YAML = DOCKER / "dagster" / "workspace.yaml"
USER_CODE_DOCKERFILE = DOCKER / "user-code" / "Dockerfile"
DAGSTER_DOCKERFILE = DOCKER / "dagster" / "Dockerfile"
PG_INIT_SCRIPT = DOCKER / "postgres" / "initdb" / "10-dagster-storage.sh"
REDIS_START = DOCKER / "redis" / "start-redis.sh"
MINIO_INIT = DOCKER / "minio" / "init_buckets.py"
GENERATE_ENV = DOCKER / "generate-env.sh"
HELM_VALUES = ROOT / "deploy" / "helm" / "values.yaml"
DEPLOYMENT_DOC = ROOT / "docs" / "deployment.md"
VENV_BIN = Path(sys.executable).parent

USER_CODE_SERVICE = "dagster-user-code"
DAGSTER_PG_SERVICE = "dagster-postgres"
DAEMON_SERVICE = "dagster-daemon"
WEBSERVER_SERVICE = "dagster-webserver"
# Absolute host paths a service may bind-mount: the Docker socket, for DockerRunLauncher.
HOST_PATHS = {"/var/run/docker.sock"}
# Variables Compose itself reads from .env rather than interpolating into the file.
COMPOSE_OWN_VARIABLES = {"COMPOSE_PROJECT_NAME"}
# Values that must never stand in .env.example (well-known defaults of the stores' images).
KNOWN_DEFAULT_SECRETS = {"minioadmin", "milvus", "password", "postgres", "changeme", "admin",
                         "secret", "root", "redis"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN")
# Standard variables that libraries honour (a private CA for TLS to MinIO/S3), not settings of
# rag_backup: unset by default; docs/deployment.md says how to add them when needed.
PLATFORM_VARIABLES = {"SSL_CERT_FILE", "AWS_CA_BUNDLE", "REQUESTS_CA_BUNDLE", "PATH", "COLUMNS"}


# -- reading the files ---------------------------------------------------------------------

def load_yaml(path: Path) -> dict:
    with path.open() as f:
        return yaml.safe_load(f)


def parse_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines (comments and blank lines skipped), as Compose reads a plain .env."""
    env = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", name), f"{path.name}: bad line {line!r}"
        env[name] = value
    return env


def secret_markers(path: Path) -> set[str]:
    """Variables preceded by a ``# secret`` comment line in .env.example."""
    lines = path.read_text().splitlines()
    return {nxt.partition("=")[0] for line, nxt in zip(lines, lines[1:])
            if line.startswith("# secret") and "=" in nxt}


INTERPOLATION = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(Exception):
    pass


def interpolate(value, env: Mapping[str, str]):
    """Compose's interpolation of every string in ``value`` ($$, ${V}, ${V:-d}, ${V-d},
    ${V:?msg}, ${V?msg}, ${V:+alt}, ${V+alt}, $V); a missing required variable raises."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        name = m["braced"] or m["named"]
        op, arg = m["op"], m["arg"] or ""
        is_set = name in env
        is_nonempty = bool(env.get(name))
        if op in (":-", "-"):
            return env[name] if (is_nonempty if op == ":-" else is_set) else arg
        if op in (":?", "?"):
            if not (is_nonempty if op == ":?" else is_set):
                raise MissingVariable(f"{name}: {arg}")
            return env[name]
        if op in (":+", "+"):
            return arg if (is_nonempty if op == ":+" else is_set) else ""
        return env.get(name, "")

    return INTERPOLATION.sub(substitute, value)


def referenced_variables(text: str) -> dict[str, set[str]]:
    """Every variable the compose text interpolates, with the operators used on it."""
    found: dict[str, set[str]] = {}
    for m in INTERPOLATION.finditer(text):
        name = m["braced"] or m["named"]
        if name:
            found.setdefault(name, set()).add(m["op"] or "")
    return found


def compose_schema() -> dict:
    """The Compose Specification's JSON schema, as vendored by check-jsonschema (a copy of
    compose-spec/compose-spec's schema/compose-spec.json)."""
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    assert schema.get("title") == "Compose Specification", schema.get("title")
    return schema


def schema_errors(document: dict) -> list[str]:
    schema = compose_schema()
    validator_class = jsonschema.validators.validator_for(schema)
    validator_class.check_schema(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator_class(schema).iter_errors(document)]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, line continuations joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(arg.split("=", 1) for instr, arg in dockerfile_instructions(path)
                if instr == "ARG" and "=" in arg)


def dockerfile_copies(path: Path) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY/ADD from the build context (not --from)."""
    copies = []
    for instr, args in dockerfile_instructions(path):
        if instr not in ("COPY", "ADD"):
            continue
        words = shlex.split(args)
        flags = [w for w in words if w.startswith("--")]
        words = [w for w in words if not w.startswith("--")]
        if any(f.startswith("--from") for f in flags):
            continue
        copies.append((words[:-1], words[-1]))
    return copies


def image_files(path: Path, workdir: str = "/") -> dict[str, str]:
    """Files a Dockerfile COPYs into its image: {path in the image: path in the context}."""
    files, cwd = {}, workdir
    for instr, args in dockerfile_instructions(path):
        if instr == "WORKDIR":
            cwd = args if args.startswith("/") else f"{cwd.rstrip('/')}/{args}"
        if instr not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        sources, dest = words[:-1], words[-1]
        dest = dest if dest.startswith("/") else f"{cwd.rstrip('/')}/{dest.lstrip('./')}"
        for src in sources:
            target = (f"{dest.rstrip('/')}/{Path(src).name}"
                      if dest.endswith("/") or len(sources) > 1 else dest)
            files[target] = src
    return files


def ignore_pattern(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as a regex: ``*`` and ``?`` within a path segment, ``**`` across
    segments (Go's filepath.Match plus Docker's ``**``)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def dockerignore_excludes(patterns: list[str], relpath: str) -> bool:
    """Docker's rule: the last matching pattern wins, ``!`` re-includes, and a pattern that
    matches a directory covers everything inside it."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = ignore_pattern(pattern.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            excluded = not negate
    return excluded


def env_names_read_by(package: Path, skip: tuple[str, ...] = ()) -> set[str]:
    """Names read through dg.EnvVar(...)/EnvVar.int(...), optional_env(...),
    os.environ.get/[...]/in, os.getenv, or a mapping named ``environ`` (a parameter defaulting to
    os.environ): what a deployment must provide. A name is a string literal or a module-level
    constant holding one (``RULES_ENV = "RAG_DRILL_RULES_FILE"``)."""
    names: set[str] = set()
    constants: dict[str, str] = {}

    def literal(node) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        return constants.get(node.id) if isinstance(node, ast.Name) else None

    def is_environ(node) -> bool:
        return (isinstance(node, ast.Attribute) and node.attr == "environ") or \
            (isinstance(node, ast.Name) and node.id == "environ")

    for path in package.rglob("*.py"):
        if any(part in skip for part in path.relative_to(package).parts):
            continue
        tree = ast.parse(path.read_text(), str(path))
        constants = {t.id: n.value.value for n in tree.body if isinstance(n, ast.Assign)
                     and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)
                     for t in n.targets if isinstance(t, ast.Name)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and node.args:
                func = node.func
                dotted = ast.unparse(func)
                name = literal(node.args[0])
                if name and (dotted.endswith("EnvVar") or ".EnvVar." in f".{dotted}"
                             or dotted.endswith("optional_env") or dotted.endswith("getenv")
                             or (isinstance(func, ast.Attribute) and func.attr == "get"
                                 and is_environ(func.value))):
                    names.add(name)
            elif isinstance(node, ast.Subscript) and is_environ(node.value):
                if literal(node.slice):
                    names.add(literal(node.slice))
            elif isinstance(node, ast.Compare) and literal(node.left) \
                    and any(is_environ(c) for c in node.comparators):
                names.add(literal(node.left))
    return names


def pyproject_pin(package: str) -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name, sep, version = dep.partition("==")
        if sep and name.strip() == package:
            return version.strip()
    raise AssertionError(f"pyproject.toml does not pin {package}==...")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(interval_s)


def stop_group(proc: subprocess.Popen, sig: int = signal.SIGTERM, grace_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=grace_s)


# -- shared fixtures -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose_raw() -> dict:
    return load_yaml(COMPOSE)


@pytest.fixture(scope="module")
def generated_env(tmp_path_factory) -> dict[str, str]:
    """The .env an operator gets from `sh docker/generate-env.sh` (secrets filled)."""
    path = tmp_path_factory.mktemp("env") / ".env"
    subprocess.run(["sh", str(GENERATE_ENV), str(path)], check=True, capture_output=True,
                   timeout=30)
    return parse_env_file(path)


@pytest.fixture(scope="module")
def compose(compose_raw, generated_env) -> dict:
    """The compose file as `docker compose config` resolves it with that .env."""
    return interpolate(compose_raw, generated_env)


@pytest.fixture(scope="module")
def docker_instance_config() -> dict:
    return load_yaml(DOCKER_DAGSTER_YAML)


def service_env(compose: dict, service: str) -> dict[str, str]:
    env = compose["services"][service].get("environment") or {}
    assert isinstance(env, dict), f"{service}: write environment as a mapping"
    return {k: "" if v is None else str(v) for k, v in env.items()}


def rag_backup_reads() -> set[str]:
    """The settings rag_backup reads (RAG_*, DAGSTER_*). Any other variable it reads must be a
    standard one listed in PLATFORM_VARIABLES, so that a new setting cannot go unnoticed."""
    # The devstack is the dev/test stack, never deployed (its own RAG_DEVSTACK_CACHE).
    names = env_names_read_by(ROOT / "rag_backup", skip=("devstack",))
    assert {"RAG_BACKUP_REPOSITORY", "RAG_PG_HOST", "RAG_REDIS_PASSWORD",
            "RAG_BACKUP_TIMEZONE"} <= names, f"the scanner lost track of the code: {names}"
    settings = {n for n in names if n.startswith(("RAG_", "DAGSTER_"))}
    assert names - settings <= PLATFORM_VARIABLES, (
        f"rag_backup reads {sorted(names - settings - PLATFORM_VARIABLES)}: provide them in "
        "docker-compose.yml, docker/dagster/dagster.yaml (env_vars) and deploy/helm/values.yaml, "
        "or list a standard variable in PLATFORM_VARIABLES")
    return settings


# -- the compose file ----------------------------------------------------------------------

def test_compose_file_conforms_to_the_compose_specification(compose_raw, compose):
    assert schema_errors(compose_raw) == []
    assert schema_errors(compose) == []
    assert set(compose["services"]) >= {
        "postgres", "redis", "minio", "minio-init", "etcd", "milvus", DAGSTER_PG_SERVICE,
        USER_CODE_SERVICE, WEBSERVER_SERVICE, DAEMON_SERVICE}


def test_the_schema_check_catches_a_mistake(compose):
    broken = json.loads(json.dumps(compose))
    broken["services"]["redis"]["helthcheck"] = broken["services"]["redis"].pop("healthcheck")
    broken["services"]["postgres"]["depends_on"] = {"redis": {"condition": "service_up"}}
    errors = schema_errors(broken)
    assert any("helthcheck" in e for e in errors), errors
    assert any("service_up" in e for e in errors), errors


@pytest.mark.skipif(shutil.which("docker-compose") is None,
                    reason="Debian's docker-compose (1.29) is not installed")
def test_docker_compose_1_29_accepts_the_file(tmp_path, generated_env):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in generated_env.items()))
    # Compose lets the shell's variables override .env: give it none but the basics.
    child_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    proc = subprocess.run(["docker-compose", "--env-file", str(env_file), "-f", str(COMPOSE),
                           "config", "-q"], cwd=ROOT, env=child_env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_compose_refuses_to_start_without_the_secrets(compose_raw):
    """With .env.example copied as it is, every required secret stops `up` with a message."""
    example = parse_env_file(ENV_EXAMPLE)
    with pytest.raises(MissingVariable) as missing:
        interpolate(compose_raw, example)
    assert "in .env" in str(missing.value)
    required = {name for name, ops in referenced_variables(COMPOSE.read_text()).items()
                if ":?" in ops}
    for name in required & secret_markers(ENV_EXAMPLE):
        with pytest.raises(MissingVariable, match=name):
            interpolate(compose_raw, {**{k: "x" for k in required}, name: ""})


def test_every_compose_variable_is_documented_in_env_example():
    used = set(referenced_variables(COMPOSE.read_text()))
    documented = set(parse_env_file(ENV_EXAMPLE))
    assert used - documented == set(), "document these in .env.example"
    assert documented - used - COMPOSE_OWN_VARIABLES == set(), "stale in .env.example"


def test_env_example_holds_placeholders_not_secrets():
    example = parse_env_file(ENV_EXAMPLE)
    markers = secret_markers(ENV_EXAMPLE)
    for name, value in example.items():
        if SECRET_NAME.search(name) or name in markers:
            assert value == "", f"{name}: leave secrets empty in .env.example"
        assert value.lower() not in KNOWN_DEFAULT_SECRETS, f"{name}={value}: a well-known default"
        assert not re.search(r"['\"$ ]", value), f"{name}: plain values only (no quotes, $, spaces)"
    required_secrets = {name for name, ops in referenced_variables(COMPOSE.read_text()).items()
                        if ":?" in ops and SECRET_NAME.search(name)}
    assert required_secrets <= markers, "mark required secrets with '# secret' in .env.example"


def test_generate_env_fills_each_secret_once(tmp_path):
    env_file = tmp_path / ".env"
    first = subprocess.run(["sh", str(GENERATE_ENV), str(env_file)], capture_output=True,
                           text=True, timeout=30, check=True)
    generated = parse_env_file(env_file)
    example = parse_env_file(ENV_EXAMPLE)
    markers = secret_markers(ENV_EXAMPLE)
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    values = [generated[name] for name in markers]
    assert all(re.fullmatch(r"[0-9a-f]{48}", v) for v in values)
    assert len(set(values)) == len(values), "each secret is generated separately"
    assert {k: v for k, v in generated.items() if k not in markers} == \
        {k: v for k, v in example.items() if k not in markers}
    assert not any(v in first.stdout + first.stderr for v in values), "values are never printed"
    subprocess.run(["sh", str(GENERATE_ENV), str(env_file)], capture_output=True, timeout=30,
                   check=True)
    assert parse_env_file(env_file) == generated, "a second run changes nothing"


# -- what reaches the containers -----------------------------------------------------------

def test_user_code_daemon_and_runs_get_every_variable_rag_backup_reads(
        compose, docker_instance_config):
    reads = rag_backup_reads()
    user_code = service_env(compose, USER_CODE_SERVICE)
    daemon = service_env(compose, DAEMON_SERVICE)
    launcher = docker_instance_config["run_launcher"]
    assert launcher["class"] == "DockerRunLauncher"
    forwarded = launcher["config"]["env_vars"]
    forwarded_names = {v.partition("=")[0] for v in forwarded}
    assert reads - set(user_code) == set(), "add to the user-code service's environment"
    assert reads - forwarded_names == set(), "add to run_launcher.config.env_vars"
    # The daemon forwards a bare NAME from its own environment and fails the launch if unset.
    bare = {v for v in forwarded if "=" not in v}
    assert bare - set(daemon) == set(), "the daemon must have every forwarded variable"
    storage = {"DAGSTER_PG_HOST", "DAGSTER_PG_PORT", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD",
               "DAGSTER_PG_DB"}
    for name in (USER_CODE_SERVICE, DAEMON_SERVICE, WEBSERVER_SERVICE):
        assert storage <= set(service_env(compose, name)), name
    assert storage <= forwarded_names
    # The same values in the code server and in the runs it launches.
    assert {k: daemon[k] for k in bare} == {k: user_code[k] for k in bare}


def test_dagster_storage_is_its_own_postgresql_not_the_one_backed_up(compose, compose_raw):
    """Dagster's storage is the dagster-postgres service, with its own volume, credentials and
    init script; the Dagster services wait for it, and the backed-up server knows nothing of
    Dagster (a stop or restore of it cannot orphan a run's record or its pool slot)."""
    services = compose["services"]
    storage = services[DAGSTER_PG_SERVICE]
    assert storage["image"] == services["postgres"]["image"]
    storage_env = service_env(compose, DAGSTER_PG_SERVICE)
    for name in (USER_CODE_SERVICE, DAEMON_SERVICE, WEBSERVER_SERVICE):
        env = service_env(compose, name)
        assert env["DAGSTER_PG_HOST"] == DAGSTER_PG_SERVICE, name
        assert env["DAGSTER_PG_PORT"] == "5432"
        for key in ("DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB"):
            assert env[key] == storage_env[key], f"{name}: {key} differs from {DAGSTER_PG_SERVICE}"
        depends = services[name]["depends_on"]
        assert depends[DAGSTER_PG_SERVICE]["condition"] == "service_healthy", name
    assert service_env(compose, USER_CODE_SERVICE)["RAG_PG_HOST"] == "postgres"
    # The init script's inputs: an unprivileged role that is not the server's superuser.
    assert storage_env["POSTGRES_USER"] != storage_env["DAGSTER_PG_USER"]
    assert storage_env["POSTGRES_DB"] != storage_env["DAGSTER_PG_DB"]
    assert storage_env["POSTGRES_PASSWORD"] not in (storage_env["DAGSTER_PG_PASSWORD"], "")
    assert "$$DAGSTER_PG_USER" in json.dumps(compose_raw["services"][DAGSTER_PG_SERVICE][
        "healthcheck"]), "healthy only once the init script created the Dagster role"
    # Separate data, and nothing of Dagster on the backed-up server.
    volumes = {m.split(":")[0] for m in storage["volumes"]}
    store_volumes = {m.split(":")[0] for m in services["postgres"]["volumes"]}
    assert volumes & store_volumes == set() and "dagster-postgres-data" in volumes
    assert not [k for k in service_env(compose, "postgres") if k.startswith("DAGSTER_")]
    # Dagster's init scripts (its role and database) never run on the backed-up server; the
    # server's own (replication for the WAL receiver) create nothing of Dagster's.
    assert not any(m.startswith("./docker/postgres/initdb") for m in services["postgres"]["volumes"])
    service_init = ROOT / "docker" / "postgres" / "service-initdb"
    assert "DAGSTER" not in "".join(p.read_text() for p in service_init.iterdir())


def test_drill_rules_file_is_an_optional_mounted_file(compose, docker_instance_config):
    """RAG_DRILL_RULES_FILE is empty by default (built-in rules) and, when set, names a file in
    the rag-backup-config volume, mounted read-only where the code server and runs read it."""
    assert parse_env_file(ENV_EXAMPLE)["RAG_DRILL_RULES_FILE"] == ""
    assert service_env(compose, USER_CODE_SERVICE)["RAG_DRILL_RULES_FILE"] == ""
    user_code = {m.split(":")[1]: m for m in compose["services"][USER_CODE_SERVICE]["volumes"]}
    assert user_code["/config"].endswith(":ro")
    runs = docker_instance_config["run_launcher"]["config"]["container_kwargs"]["volumes"]
    assert "rag-backup-config:/config:ro" in runs
    assert "/config/" in (ROOT / ".env.example").read_text()


def test_the_webserver_holds_no_store_credentials(compose):
    env = service_env(compose, WEBSERVER_SERVICE)
    assert not [k for k in env if k.startswith("RAG_")]


def test_runs_share_the_network_volumes_and_image_of_the_compose_project(
        compose, docker_instance_config):
    launcher = docker_instance_config["run_launcher"]["config"]
    assert launcher["network"] == compose["networks"]["default"]["name"]
    named = {v["name"]: key for key, v in compose["volumes"].items() if v and v.get("name")}
    user_code = compose["services"][USER_CODE_SERVICE]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in user_code["volumes"]}
    for mount in launcher["container_kwargs"]["volumes"]:
        volume, path = mount.split(":")[:2]
        assert volume in named, f"{volume}: not a named volume of the compose file"
        assert mounts.get(path) == named[volume], f"{path}: mounted differently in the code server"
    compute_logs = docker_instance_config["compute_logs"]["config"]["base_dir"]
    for service in (USER_CODE_SERVICE, WEBSERVER_SERVICE):
        assert any(m.split(":")[1] == compute_logs for m in compose["services"][service]["volumes"])
    assert user_code["environment"]["DAGSTER_CURRENT_IMAGE"] == user_code["image"]
    assert "TMPDIR=/scratch" in docker_instance_config["run_launcher"]["config"]["env_vars"]
    repository = service_env(compose, USER_CODE_SERVICE)["RAG_BACKUP_REPOSITORY"]
    assert repository.startswith("s3://") or repository.startswith("/backups")


def test_services_refer_to_what_exists(compose):
    services, volumes = compose["services"], set(compose.get("volumes") or {})
    for name, service in services.items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        else:
            assert service.get("image"), f"{name}: neither image nor build"
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0]
            if source.startswith((".", "/")):
                if source in HOST_PATHS:
                    continue
                assert not source.startswith("/"), f"{name}: host path {source} outside the repo"
                assert (ROOT / source).exists(), f"{name}: bind mount {source} does not exist"
            else:
                assert source in volumes, f"{name}: volume {source} is not declared"
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name}: depends on unknown {dependency}"
        assert "healthcheck" in service or name == "minio-init", f"{name}: no healthcheck"


def test_the_mounted_scripts_are_where_the_commands_expect_them(compose):
    redis = compose["services"]["redis"]
    mounts = dict(m.split(":")[:2][::-1] for m in redis["volumes"])
    assert (ROOT / mounts[redis["entrypoint"][-1]]).resolve() == REDIS_START
    dagster_pg = compose["services"][DAGSTER_PG_SERVICE]
    mounts = dict(m.split(":")[:2][::-1] for m in dagster_pg["volumes"])
    assert (ROOT / mounts["/docker-entrypoint-initdb.d"]).resolve() == PG_INIT_SCRIPT.parent
    init = compose["services"]["minio-init"]
    in_image = image_files(USER_CODE_DOCKERFILE)
    assert (ROOT / in_image[init["command"][-1]]).resolve() == MINIO_INIT


def test_shell_scripts_parse():
    for script in (REDIS_START, GENERATE_ENV):
        subprocess.run(["sh", "-n", str(script)], check=True, timeout=30)
    subprocess.run(["bash", "-n", str(PG_INIT_SCRIPT)], check=True, timeout=30)


# -- images --------------------------------------------------------------------------------

def test_store_images_are_pinned_and_match_the_tools_in_the_user_code_image(compose):
    images = {name: s["image"] for name, s in compose["services"].items() if not s.get("build")}
    for name, image in images.items():
        tag = image.rpartition(":")[2]
        versioned = re.search(r"\d+\.\d+|\d{4}-\d\d-\d\d", tag)
        assert ":" in image and tag != "latest" and versioned, f"{name}: pin {image}"
    pg_major = re.match(r"postgres:(\d+)\.\d+", images["postgres"])
    redis_minor = re.match(r"redis:(\d+\.\d+)\.\d+", images["redis"])
    assert pg_major and redis_minor
    assert re.fullmatch(r"milvusdb/milvus:v2\.3\.\d+", images["milvus"])
    assert images["etcd"].startswith("quay.io/coreos/etcd:v3.5.")
    assert re.fullmatch(r"minio/minio:RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", images["minio"])
    run = " ".join(a for i, a in dockerfile_instructions(USER_CODE_DOCKERFILE) if i == "RUN")
    for package in (f"postgresql-client-{pg_major[1]}", "redis-tools", "redis-server", "zstd"):
        assert re.search(rf"\b{re.escape(package)}\b", run), f"user-code image lacks {package}"
    # Debian 12 (bookworm) ships Redis 7.0: the local redis-server must read production's RDBs.
    base = [a for i, a in dockerfile_instructions(USER_CODE_DOCKERFILE) if i == "FROM"]
    assert base and all(b.endswith("-bookworm") for b in base) and redis_minor[1] == "7.0"


@pytest.mark.parametrize("dockerfile", [USER_CODE_DOCKERFILE, DAGSTER_DOCKERFILE],
                         ids=["user-code", "dagster"])
def test_dockerfiles_pin_their_base_and_copy_what_exists(compose, dockerfile):
    bases = [a.split()[0] for i, a in dockerfile_instructions(dockerfile) if i == "FROM"]
    for base in bases:
        assert re.fullmatch(r"[\w./-]+:\d+\.\d+\.\d+[\w.-]*(@sha256:[0-9a-f]{64})?", base), \
            f"{dockerfile}: pin {base} to a patch version"
    [context] = {ROOT / s["build"]["context"] for s in compose["services"].values()
                 if s.get("build") and (ROOT / s["build"]["context"] /
                                        s["build"]["dockerfile"]).resolve() == dockerfile}
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    if not ignore.exists():
        ignore = context / ".dockerignore"
    patterns = [p.strip() for p in ignore.read_text().splitlines()
                if p.strip() and not p.startswith("#")] if ignore.exists() else []
    if context == ROOT:
        assert patterns, "a build context at the repository root needs an ignore file"
        for secret_path in (".env", ".venv/bin/python", ".devstack/state.json", ".git/config"):
            assert dockerignore_excludes(patterns, secret_path), f"{secret_path} would be sent"
    for sources, _ in dockerfile_copies(dockerfile):
        for source in sources:
            assert (context / source).exists(), f"{dockerfile}: COPY {source}: missing"
            assert not dockerignore_excludes(patterns, source.rstrip("/")), \
                f"{dockerfile}: COPY {source} is excluded by {ignore.name}"


def test_images_install_the_dagster_release_of_pyproject():
    dagster, libs = pyproject_pin("dagster"), pyproject_pin("dagster-postgres")
    assert dockerfile_args(DAGSTER_DOCKERFILE) == {"DAGSTER_VERSION": dagster,
                                                   "DAGSTER_LIBS_VERSION": libs}
    assert dockerfile_args(USER_CODE_DOCKERFILE)["DAGSTER_LIBS_VERSION"] == libs
    assert pyproject_pin("dagster-webserver") == dagster
    run = " ".join(a for i, a in dockerfile_instructions(DAGSTER_DOCKERFILE) if i == "RUN")
    for package in ("dagster", "dagster-webserver", "dagster-postgres", "dagster-docker"):
        assert f'"{package}==' in run


def test_the_dagster_image_carries_the_instance_and_workspace_it_is_started_with(compose):
    files = image_files(DAGSTER_DOCKERFILE)
    context = DAGSTER_DOCKERFILE.parent
    home = compose["services"][WEBSERVER_SERVICE]["command"][-1].rpartition("/")[0]
    assert (context / files[f"{home}/workspace.yaml"]).resolve() == DOCKER_WORKSPACE_YAML
    assert (context / files[f"{home}/dagster.yaml"]).resolve() == DOCKER_DAGSTER_YAML
    assert compose["services"][DAEMON_SERVICE]["command"][-1] == f"{home}/workspace.yaml"
    user_files = image_files(USER_CODE_DOCKERFILE)
    assert (ROOT / user_files["/opt/dagster/home/dagster.yaml"]).resolve() == DOCKER_DAGSTER_YAML


# -- Dagster's own validation of dagster.yaml and workspace.yaml ---------------------------

@pytest.mark.parametrize("path", [ROOT / "dagster.yaml", DOCKER_DAGSTER_YAML],
                         ids=["repository", "docker"])
def test_dagster_yaml_passes_dagster_validation(tmp_path, path):
    """The instance schema, then each configurable class's own config schema, loaded the way
    the instance loads them (``dagster.core.*`` names are mapped to ``dagster._core.*``)."""
    from dagster._core.instance.config import dagster_instance_config
    from dagster._serdes import ConfigurableClassData

    shutil.copy(path, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    for key in ("run_coordinator", "run_launcher", "compute_logs"):
        if key in config:
            data = ConfigurableClassData(config[key]["module"], config[key]["class"],
                                         yaml.safe_dump(config[key].get("config") or {}))
            assert data.rehydrate() is not None, key


def test_dagster_validation_rejects_misplaced_run_monitoring_keys(tmp_path):
    """The check above has teeth: Dagster's schema knows free_slots_after_run_end_seconds only
    under run_monitoring (not under concurrency.pools), and rejects unknown keys there."""
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    config = load_yaml(ROOT / "dagster.yaml")
    for broken in ({**config, "concurrency": {**config["concurrency"], "pools": {
                        **config["concurrency"]["pools"], "free_slots_after_run_end_seconds": 60}}},
                   {**config, "run_monitoring": {**config["run_monitoring"],
                                                 "free_slot_after_run_end_seconds": 60}}):
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(broken))
        with pytest.raises(DagsterInvalidConfigError):
            dagster_instance_config(str(tmp_path))


@pytest.mark.parametrize("path", [ROOT / "dagster.yaml", DOCKER_DAGSTER_YAML],
                         ids=["repository", "docker"])
def test_run_monitoring_fails_orphaned_runs_and_frees_their_slots_within_minutes(path):
    """What the issue needs: monitoring on, slots of ended runs freed, a hung run ended, a crashed
    run not resumed (the catch-up sensor retries it), and a dead worker's slot free again within
    5 minutes (two polls plus the grace before freeing). rag_backup_tests/test_orphaned_runs.py
    proves the mechanism with real processes."""
    monitoring = load_yaml(path)["run_monitoring"]
    assert monitoring["enabled"] is True
    assert monitoring["free_slots_after_run_end_seconds"] > 0
    assert monitoring["max_runtime_seconds"] >= 4 * 3600, "longer than the RTO of a restore"
    assert monitoring.get("max_resume_run_attempts", 0) == 0
    worst_case = 2 * monitoring["poll_interval_seconds"] + \
        monitoring["free_slots_after_run_end_seconds"]
    assert worst_case <= 300, f"a dead worker's slot is held up to {worst_case} s"
    assert monitoring["start_timeout_seconds"] > 0 and monitoring["cancel_timeout_seconds"] > 0


def test_docker_dagster_yaml_keeps_the_repository_settings(docker_instance_config):
    repository = load_yaml(ROOT / "dagster.yaml")
    for key in ("storage", "run_coordinator", "concurrency", "run_monitoring", "telemetry",
                "nux"):
        assert docker_instance_config[key] == repository[key], key


def test_workspaces_load(compose):
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    [local] = location_origins_from_yaml_paths([str(ROOT / "workspace.yaml")])
    assert local.location_name == "rag_backup"
    [remote] = location_origins_from_yaml_paths([str(DOCKER_WORKSPACE_YAML)])
    assert isinstance(remote, GrpcServerCodeLocationOrigin)
    assert remote.location_name == local.location_name
    command = compose["services"][remote.host]["command"]
    assert command[command.index("-p") + 1] == str(remote.port)
    assert command[command.index("--location-name") + 1] == remote.location_name


# -- PostgreSQL: the init script, and Dagster's storage on it ------------------------------

class Postgres15:
    """A throwaway cluster initialised the way the postgres image does it: superuser
    $POSTGRES_USER with a password, trust on the unix socket, scram-sha-256 over TCP."""

    def __init__(self, superuser: str, password: str) -> None:
        from rag_backup.devstack.postgres_server import find_pg_bindir

        self.bindir = find_pg_bindir()
        self.superuser, self.password = superuser, password
        self.root = Path(tempfile.mkdtemp(prefix="rag-deploy-pg-"))
        self.run_as = "postgres" if os.geteuid() == 0 else None
        if self.run_as:
            shutil.chown(self.root, self.run_as, self.run_as)
        self.data, self.socket_dir = self.root / "data", self.root / "run"
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def _as_server(self, argv: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(argv, user=self.run_as, capture_output=True, text=True,
                              timeout=120, **kwargs)

    def start(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        pwfile.chmod(0o600)
        if self.run_as:
            shutil.chown(pwfile, self.run_as, self.run_as)
        self.socket_dir.mkdir(mode=0o700)
        if self.run_as:
            shutil.chown(self.socket_dir, self.run_as, self.run_as)
        init = self._as_server([str(self.bindir / "initdb"), "-D", str(self.data), "-U",
                                self.superuser, f"--pwfile={pwfile}", "--auth-local=trust",
                                "--auth-host=scram-sha-256", "-E", "UTF8", "--no-instructions"])
        assert init.returncode == 0, init.stderr
        pwfile.unlink()
        self.proc = subprocess.Popen(
            [str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1"],
            user=self.run_as, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_for(lambda: self.proc.poll() is None and subprocess.run(
            [str(self.bindir / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
            capture_output=True, timeout=10).returncode == 0, 60, "PostgreSQL")

    def client_env(self, **extra: str) -> dict[str, str]:
        return {"PATH": f"{self.bindir}:/usr/bin:/bin", "PGHOST": str(self.socket_dir),
                "PGPORT": str(self.port), "LANG": "C.UTF-8", **extra}

    def dagster_env(self) -> dict[str, str]:
        """DAGSTER_PG_* for the role and database the init script created."""
        return {"DAGSTER_PG_HOST": "127.0.0.1", "DAGSTER_PG_PORT": str(self.port),
                "DAGSTER_PG_USER": DAGSTER_ROLE, "DAGSTER_PG_PASSWORD": DAGSTER_PASSWORD,
                "DAGSTER_PG_DB": DAGSTER_DB}

    def connect(self, user: str, password: str, dbname: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=user, password=password,
                                dbname=dbname, connect_timeout=10)

    def stop(self) -> None:
        if self.proc:
            stop_group(self.proc, signal.SIGINT)
        shutil.rmtree(self.root, ignore_errors=True)


SUPERUSER, SUPERUSER_PASSWORD = "ragqa_user", secrets.token_hex(16)
# Names that need quoting and a password that needs escaping, to prove both are handled.
DAGSTER_ROLE, DAGSTER_DB = "dagster-storage", "dagster store"
DAGSTER_PASSWORD = "it's a \"pass\\word\" with $HOME and spaces " + secrets.token_hex(4)


@pytest.fixture(scope="module")
def postgres_with_dagster_storage() -> Iterator[Postgres15]:
    server = Postgres15(SUPERUSER, SUPERUSER_PASSWORD)
    try:
        server.start()
        with contextlib.closing(server.connect(SUPERUSER, SUPERUSER_PASSWORD, "postgres")) as c:
            c.autocommit = True
            c.cursor().execute("CREATE DATABASE ragqa")  # what POSTGRES_DB=ragqa does
        run = subprocess.run(["bash", str(PG_INIT_SCRIPT)], capture_output=True, text=True,
                             timeout=60, env=server.client_env(
                                 POSTGRES_USER=SUPERUSER, POSTGRES_PASSWORD=SUPERUSER_PASSWORD,
                                 POSTGRES_DB="ragqa", DAGSTER_PG_USER=DAGSTER_ROLE,
                                 DAGSTER_PG_PASSWORD=DAGSTER_PASSWORD, DAGSTER_PG_DB=DAGSTER_DB))
        assert run.returncode == 0, run.stderr
        yield server
    finally:
        server.stop()


def test_init_script_creates_a_separate_unprivileged_dagster_role_and_database(
        postgres_with_dagster_storage):
    import psycopg2

    pg = postgres_with_dagster_storage
    with contextlib.closing(pg.connect(SUPERUSER, SUPERUSER_PASSWORD, "postgres")) as conn:
        cur = conn.cursor()
        cur.execute("SELECT rolsuper, rolcreatedb, rolcreaterole, rolcanlogin FROM pg_roles "
                    "WHERE rolname = %s", (DAGSTER_ROLE,))
        assert cur.fetchone() == (False, False, False, True)
        cur.execute("SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                    (DAGSTER_DB,))
        assert cur.fetchone() == (DAGSTER_ROLE,)
        cur.execute("SELECT has_database_privilege(%s, 'ragqa', 'CONNECT'), "
                    "has_database_privilege('public', %s, 'CONNECT')", (DAGSTER_ROLE, DAGSTER_DB))
        assert cur.fetchone() == (False, False)
    with contextlib.closing(pg.connect(DAGSTER_ROLE, DAGSTER_PASSWORD, DAGSTER_DB)) as conn:
        conn.cursor().execute("CREATE TABLE probe (id int)")  # it owns its database
    with pytest.raises(psycopg2.OperationalError, match="permission denied"):
        pg.connect(DAGSTER_ROLE, DAGSTER_PASSWORD, "ragqa").close()


def test_init_script_is_idempotent_when_sourced_and_refuses_missing_settings(
        postgres_with_dagster_storage):
    pg = postgres_with_dagster_storage
    settings = dict(POSTGRES_USER=SUPERUSER, POSTGRES_DB="ragqa", DAGSTER_PG_USER=DAGSTER_ROLE,
                    DAGSTER_PG_PASSWORD=DAGSTER_PASSWORD, DAGSTER_PG_DB=DAGSTER_DB)
    # The image sources a non-executable *.sh under `set -Eeo pipefail`.
    sourced = ["bash", "-c", 'set -Eeo pipefail; source "$0"; echo done', str(PG_INIT_SCRIPT)]
    again = subprocess.run(sourced, capture_output=True, text=True, timeout=60,
                           env=pg.client_env(**settings))
    assert again.returncode == 0 and again.stdout.strip().endswith("done"), again.stderr
    missing = subprocess.run(sourced, capture_output=True, text=True, timeout=60,
                             env=pg.client_env(**{**settings, "DAGSTER_PG_PASSWORD": ""}))
    assert missing.returncode != 0 and "DAGSTER_PG_PASSWORD" in missing.stderr
    same = subprocess.run(["bash", str(PG_INIT_SCRIPT)], capture_output=True, text=True,
                          timeout=60, env=pg.client_env(**{**settings,
                                                           "DAGSTER_PG_USER": SUPERUSER}))
    assert same.returncode != 0 and "must differ" in same.stderr


@pytest.mark.parametrize("path", [DOCKER_DAGSTER_YAML, ROOT / "dagster.yaml"],
                         ids=["docker", "repository"])
def test_dagster_instance_runs_on_the_dagster_role(postgres_with_dagster_storage, tmp_path,
                                                   monkeypatch, path):
    from dagster import DagsterInstance

    for name, value in postgres_with_dagster_storage.dagster_env().items():
        monkeypatch.setenv(name, value)
    shutil.copy(path, tmp_path / "dagster.yaml")
    with DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.get_runs(limit=1) == []
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        # Pool slots live in the event log storage, which must support them; monitoring is on.
        assert instance.event_log_storage.supports_global_concurrency_limits
        configured = load_yaml(path)["run_monitoring"]
        assert instance.run_monitoring_enabled
        assert instance.run_monitoring_settings == configured
        assert instance.run_monitoring_max_runtime_seconds == configured["max_runtime_seconds"]
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
        launcher = instance.run_launcher
        if path == DOCKER_DAGSTER_YAML:
            assert type(launcher).__name__ == "DockerRunLauncher"
            assert launcher.networks == ["rag-backup"]
            assert type(instance.compute_log_manager).__name__ == "LocalComputeLogManager"
    if path == DOCKER_DAGSTER_YAML:
        # The upgrade step of docs/deployment.md, as the Dagster role.
        migrate = subprocess.run([str(VENV_BIN / "dagster"), "instance", "migrate"],
                                 env={**os.environ, "DAGSTER_HOME": str(tmp_path)},
                                 capture_output=True, text=True, timeout=180)
        assert migrate.returncode == 0, migrate.stdout + migrate.stderr


def test_user_code_container_serves_the_definitions(tmp_path, compose,
                                                    postgres_with_dagster_storage):
    """The user-code service's own command, with nothing but its compose environment (and the
    image's DAGSTER_HOME/TMPDIR), serves the Definitions; the webserver's workspace reaches it.
    The code server opens the Dagster instance at start, so the storage settings point at the
    throwaway PostgreSQL instead of the compose service "postgres"."""
    from dagster import DagsterInstance
    from dagster._core.workspace.load import location_origins_from_yaml_paths

    service = compose["services"][USER_CODE_SERVICE]
    command = list(service["command"])
    port = free_port()
    command[command.index("-h") + 1] = "127.0.0.1"
    command[command.index("-p") + 1] = str(port)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(DOCKER_DAGSTER_YAML, home / "dagster.yaml")
    pg = postgres_with_dagster_storage
    env = {**service_env(compose, USER_CODE_SERVICE), **pg.dagster_env(),
           "DAGSTER_HOME": str(home),
           "TMPDIR": str(tmp_path), "PATH": f"{VENV_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8",
           "HOME": str(tmp_path)}
    log = tmp_path / "code-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / command[0]), *command[1:]], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def healthy() -> bool:
            assert proc.poll() is None, f"code server exited:\n{log.read_text()[-3000:]}"
            probe = subprocess.run([str(VENV_BIN / "dagster"), "api", "grpc-health-check",
                                    "-p", str(port)], capture_output=True, timeout=30)
            return probe.returncode == 0
        wait_for(healthy, 150, "the code server", interval_s=1)

        workspace = yaml.safe_load(DOCKER_WORKSPACE_YAML.read_text())
        workspace["load_from"][0]["grpc_server"].update(host="127.0.0.1", port=port)
        (tmp_path / "workspace.yaml").write_text(yaml.safe_dump(workspace))
        [origin] = location_origins_from_yaml_paths([str(tmp_path / "workspace.yaml")])
        with DagsterInstance.ephemeral() as instance, \
                origin.create_location(instance) as location:
            assert location.container_image == service["image"]
            [repository] = location.get_repositories().values()
            jobs = {job.name for job in repository.get_all_jobs()}
            assert {"postgres_backup_job", "redis_backup_job", "restore_postgres_job"} <= jobs
    finally:
        stop_group(proc)


# -- Redis: the password stays off every command line --------------------------------------

def test_redis_starts_from_the_generated_config_with_persistence(tmp_path):
    password = "p@ss \"word\" \\ with $PATH and # " + secrets.token_hex(4)
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    conf = tmp_path / "conf" / "redis.conf"
    env = {"PATH": "/usr/bin:/bin", "REDIS_PASSWORD": password, "REDIS_CONF": str(conf),
           "REDIS_DATA_DIR": str(data), "REDIS_PORT": str(port), "REDIS_BIND": "127.0.0.1"}
    proc = subprocess.Popen(["sh", str(REDIS_START), "redis-server"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)

    def cli(*args: str, auth: str | None = None) -> str:
        cli_env = {"PATH": "/usr/bin:/bin", **({"REDISCLI_AUTH": auth} if auth else {})}
        return subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                              env=cli_env, capture_output=True, text=True, timeout=10).stdout

    try:
        wait_for(lambda: proc.poll() is None and "PONG" in cli("PING", auth=password), 30,
                 "redis-server")
        assert "NOAUTH" in cli("PING")
        assert cli("CONFIG", "GET", "appendonly", auth=password).split() == ["appendonly", "yes"]
        assert cli("CONFIG", "GET", "dir", auth=password).split()[1] == str(data)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"redis-server" in cmdline, "the script execs the server in its own process"
        assert password.encode() not in cmdline and b"REDIS_PASSWORD" not in environ
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert stat.S_IMODE(conf.parent.stat().st_mode) == 0o700
    finally:
        stop_group(proc)
    empty = subprocess.run(["sh", str(REDIS_START), "redis-server"], capture_output=True,
                           text=True, timeout=10, env={**env, "REDIS_PASSWORD": ""})
    assert empty.returncode == 1 and "RAG_REDIS_PASSWORD" in empty.stderr


# -- MinIO: the bootstrap on a real S3 server ----------------------------------------------

def load_minio_init():
    spec = importlib.util.spec_from_file_location("rag_backup_minio_init", MINIO_INIT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def s3_server() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def test_minio_init_creates_the_buckets_idempotently(s3_server, compose, capsys):
    from minio import Minio

    init = load_minio_init()
    env = {**service_env(compose, "minio-init"), "MINIO_ENDPOINT": s3_server,
           "RAG_S3_ACCESS_KEY": "", "RAG_BACKUP_REPOSITORY": "s3://offsite-copy/rag-backup",
           "MINIO_INIT_TIMEOUT_S": "10"}
    assert init.main(env) == 0
    assert init.main(env) == 0, "a second run is a no-op"
    client = Minio(s3_server.removeprefix("http://"), access_key=env["MINIO_ROOT_USER"],
                   secret_key=env["MINIO_ROOT_PASSWORD"], secure=False, region="us-east-1")
    assert {b.name for b in client.list_buckets()} >= {"documents", "models", "backups",
                                                       "offsite-copy"}
    out = capsys.readouterr()
    assert env["MINIO_ROOT_PASSWORD"] not in out.out + out.err


def test_minio_init_gives_rag_backup_its_own_user():
    init = load_minio_init()

    class Admin:
        def __init__(self, policies: str) -> None:
            self.calls, self.policies = [], policies

        def user_add(self, access_key, secret_key):
            self.calls.append(("user_add", access_key, secret_key))

        def user_info(self, access_key):
            return json.dumps({"status": "enabled", "policyName": self.policies})

        def attach_policy(self, policies, user=None):
            self.calls.append(("attach_policy", tuple(policies), user))

    fresh = Admin("")
    init.ensure_user(fresh, "rag-backup", "s3cr3t-value")
    assert fresh.calls == [("user_add", "rag-backup", "s3cr3t-value"),
                           ("attach_policy", ("readwrite",), "rag-backup")]
    existing = Admin("consoleAdmin,readwrite")
    init.ensure_user(existing, "rag-backup", "s3cr3t-value")
    assert existing.calls == [("user_add", "rag-backup", "s3cr3t-value")]


def test_minio_init_says_what_is_missing(compose):
    init = load_minio_init()
    env = service_env(compose, "minio-init")
    assert init.main({**env, "MINIO_ROOT_PASSWORD": ""}) == 1
    assert init.main({**env, "RAG_BACKUP_REPOSITORY": "s3:///no-bucket"}) == 1
    closed = f"http://127.0.0.1:{free_port()}"
    assert init.main({**env, "MINIO_ENDPOINT": closed, "MINIO_INIT_TIMEOUT_S": "1"}) == 1


# -- Kubernetes --------------------------------------------------------------------------------

def test_helm_values_name_the_image_the_storage_and_the_secrets():
    values = load_yaml(HELM_VALUES)
    [deployment] = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["enabled"] is True
    assert deployment["image"]["repository"].endswith("rag-backup/user-code")
    assert deployment["image"]["tag"] not in ("", "latest")
    args = deployment["codeServerArgs"]
    assert args[args.index("-m") + 1] == "rag_backup.definitions"
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    assert values["runLauncher"]["type"] == "K8sRunLauncher"

    postgresql = values["postgresql"]
    assert postgresql["enabled"] is False and postgresql["postgresqlHost"]
    assert postgresql["postgresqlScheme"] == "postgresql+psycopg2"
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["global"]["postgresqlSecretName"]
    assert "postgresqlPassword" not in postgresql

    env = {e["name"]: e for e in deployment["env"]}
    assert rag_backup_reads() - set(env) == set(), "add to the user deployment's env"
    for name, entry in env.items():
        if SECRET_NAME.search(name) or name in ("RAG_S3_ACCESS_KEY", "RAG_ALERT_WEBHOOK_URL"):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            assert ref and ref["name"] and ref["key"] == name and "value" not in entry, \
                f"{name}: take it from a Kubernetes secret"

    repository = load_yaml(ROOT / "dagster.yaml")["concurrency"]
    assert values["concurrency"]["pools"]["defaultLimit"] == repository["pools"]["default_limit"]
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] == \
        repository["runs"]["max_concurrent_runs"]
    assert env["TMPDIR"]["value"] == "/scratch"
    assert "/scratch" in {m["mountPath"] for m in deployment["volumeMounts"]}
    # The drill's rules file: optional (a ConfigMap that may be absent), read-only at /config.
    assert env["RAG_DRILL_RULES_FILE"]["value"] == ""
    [config] = [v for v in deployment["volumes"] if v["name"] == "config"]
    assert config["configMap"]["optional"] is True
    assert {"name": "config", "mountPath": "/config", "readOnly": True} in \
        deployment["volumeMounts"]
    # Dagster's storage is not the backed-up server.
    assert postgresql["postgresqlHost"] != env["RAG_PG_HOST"]["value"]


def test_helm_run_monitoring_matches_the_dagster_yaml():
    """The chart renders dagsterDaemon.runMonitoring into run_monitoring (camelCase keys); the
    chart renders no max runtime, so Kubernetes enforces it on the run's Job."""
    values = load_yaml(HELM_VALUES)
    monitoring = load_yaml(DOCKER_DAGSTER_YAML)["run_monitoring"]
    camel = {re.sub(r"_(\w)", lambda m: m[1].upper(), k): v for k, v in monitoring.items()
             if k != "max_runtime_seconds"}
    assert values["dagsterDaemon"]["runMonitoring"] == camel
    job_spec = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]["jobSpecConfig"]
    assert job_spec["activeDeadlineSeconds"] == monitoring["max_runtime_seconds"]


# -- the operator's document ---------------------------------------------------------------

def test_deployment_doc_covers_the_operator_steps_and_names_real_files():
    doc = DEPLOYMENT_DOC.read_text()
    for step in ("cp .env.example .env", "docker compose up -d", "dagster instance migrate",
                 "s3://backups/rag-backup", "K8sRunLauncher", "deploy/helm/values.yaml",
                 "restore_postgres_job", "Launchpad", "dagster-postgres", "Orphaned runs",
                 "free_slots_after_run_end_seconds", "RAG_DRILL_RULES_FILE",
                 "DAGSTER_PG_ADMIN_PASSWORD"):
        assert step in doc, f"docs/deployment.md does not mention {step!r}"
    for path in re.findall(r"`((?:docker|deploy|rag_backup|docs)/[\w./-]+)`", doc):
        assert (ROOT / path).exists(), f"docs/deployment.md names {path}, which does not exist"
    services = set(load_yaml(COMPOSE)["services"])
    for command, rest in re.findall(r"docker compose (logs|exec|run|restart|stop|up)\b([^`\n]*)",
                                    doc):
        words = [w for w in rest.split() if not w.startswith("-")]
        named = words[:1] if command in ("exec", "run") else words
        assert set(named) <= services, f"docs/deployment.md: docker compose {command}{rest}"


def test_the_wal_receiver_runs_beside_dagster_in_compose_and_helm(compose):
    """Point-in-time recovery needs the WAL receiver running all the time: a compose service
    and a Kubernetes Deployment (one replica: one replication slot), and a server configured
    for it (replication allowed, the slot's WAL capped)."""
    receiver = compose["services"]["wal-receiver"]
    assert receiver["command"] == ["python", "-m", "rag_backup", "wal-receiver"]
    assert receiver["restart"] == "unless-stopped"
    assert receiver["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = service_env(compose, "wal-receiver")
    for name in ("RAG_BACKUP_REPOSITORY", "RAG_PG_HOST", "RAG_PG_PASSWORD", "RAG_PG_WAL_DIR"):
        assert name in env, name
    spool = env["RAG_PG_WAL_DIR"]
    assert any(m.endswith(f":{spool}") for m in receiver["volumes"]), "the spool survives"
    assert "wal-status" in receiver["healthcheck"]["test"]
    assert any("max_slot_wal_keep_size" in part for part in compose["services"]["postgres"]["command"])
    hba = (ROOT / "docker" / "postgres" / "service-initdb" / "20-replication.sh").read_text()
    assert "host replication" in hba

    values = load_yaml(HELM_VALUES)
    [deployment] = [m for m in values["extraManifests"] if m["kind"] == "Deployment"]
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate"
    [container] = spec["template"]["spec"]["containers"]
    assert container["command"] == ["python", "-m", "rag_backup", "wal-receiver"]
    [code] = values["dagster-user-deployments"]["deployments"]
    assert container["image"] == f"{code['image']['repository']}:{code['image']['tag']}"
    k8s_env = {e["name"]: e for e in container["env"]}
    assert k8s_env["RAG_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"] == "RAG_PG_PASSWORD"
    claim = spec["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim in {m["metadata"]["name"] for m in values["extraManifests"]
                     if m["kind"] == "PersistentVolumeClaim"}
