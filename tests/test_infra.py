"""infra/: the image, the Compose cluster and the KubeRay manifests, checked without pulling an
image or starting a cluster. Every file parses; KubeRay's required fields are there; and every
`chemmap` command, config file, port, image, Secret and shared path the files name exists in this
repository and agrees with the code, the other files and the defaults of Ray and MLflow."""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from ray._private import ray_constants

from chemmap.cli import app
from chemmap.config import load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
DOCKERFILE = INFRA / "Dockerfile"
COMPOSE = INFRA / "docker-compose.yml"
COMPOSE_FILES = sorted(INFRA.glob("docker-compose*.yml"))
MANIFESTS = sorted(K8S.glob("*.yaml"))
INFRA_README = INFRA / "README.md"

# Where the services listen by default; the files must agree.
RAY_GCS_PORT = ray_constants.DEFAULT_PORT  # 6379
RAY_DASHBOARD_PORT = ray_constants.DEFAULT_DASHBOARD_PORT  # 8265: job submission
RAY_CLIENT_PORT = 10001  # `ray start --ray-client-server-port`'s default (ray start --help)
MINIO_PORT = 9000  # MinIO's S3 API
POSTGRES_PORT = 5432
DASK_SCHEDULER_PORT = 8786  # `dask scheduler`'s default
# Ray's token authentication (Ray >= 2.52): the mode, and the token as a variable; KubeRay's
# Secret holds it under this key.
RAY_AUTH_MODE, RAY_AUTH_TOKEN, KUBERAY_TOKEN_KEY = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "auth_token"
SHARED_MOUNT = "/shared"
SECRETISH = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY")


# --------------------------------------------------------------------------- reading the files


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _objects(kind: str) -> list[dict[str, Any]]:
    return [d for p in MANIFESTS for d in _docs(p) if d.get("kind") == kind]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in _objects(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''} in infra/k8s, found {len(found)}"
    return found[0]


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, rest) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _instructions(name: str) -> list[str]:
    return [rest for word, rest in _dockerfile() if word == name]


def _version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def _image_tag() -> str:
    """The image's name and tag: its LABELs say what the Dockerfile builds."""
    labels = dict(
        re.findall(r'org\.opencontainers\.image\.(\w+)="([^"]*)"', " ".join(_instructions("LABEL")))
    )
    return f"{labels['title']}:{labels['version']}"


def _app_dir() -> str:
    (workdir,) = _instructions("WORKDIR")
    return workdir


def _ray_cluster_specs() -> list[dict[str, Any]]:
    """The RayCluster's spec and every RayJob's rayClusterSpec."""
    return [c["spec"] for c in _objects("RayCluster")] + [
        j["spec"]["rayClusterSpec"] for j in _objects("RayJob")
    ]


def _ray_pod_specs(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [spec["headGroupSpec"]["template"]["spec"]] + [
        g["template"]["spec"] for g in spec["workerGroupSpecs"]
    ]


def _ray_containers() -> list[dict[str, Any]]:
    return [c for spec in _ray_cluster_specs() for pod in _ray_pod_specs(spec) for c in pod["containers"]]


def _pod_specs() -> Iterator[dict[str, Any]]:
    """Every pod template in infra/k8s."""
    for spec in _ray_cluster_specs():
        yield from _ray_pod_specs(spec)
    for kind in ("Deployment", "StatefulSet"):
        for obj in _objects(kind):
            yield obj["spec"]["template"]["spec"]


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


# --------------------------------------------------------------------------- commands in the files

_SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", "$", "$("}


def _split_shell(text: str) -> list[list[str]]:
    """Simple commands of a shell text: tokens split at &&, |, ; and newlines (quotes respected)."""
    out = []
    for line in re.sub(r"\\\n", " ", text).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        try:
            tokens = list(lexer)
        except ValueError:  # prose with an apostrophe, not a command
            continue
        current: list[str] = []
        for tok in tokens:
            if tok in _SEPARATORS or set(tok) <= set("&|;()<>"):
                out.append(current)
                current = []
            else:
                current.append(tok)
        out.append(current)
    return [c for c in out if c]


def _code_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```(?:bash|sh|shell|console)?\n(.*?)^```", markdown, flags=re.S | re.M)


def _strings(node: Any) -> Iterator[str | list[str]]:
    """Every string of a YAML document, and every list of strings (an exec-form command) whole."""
    if isinstance(node, dict):
        for v in node.values():
            yield from _strings(v)
    elif isinstance(node, list):
        if node and all(isinstance(x, str) for x in node):
            yield list(node)
        for v in node:
            yield from _strings(v)
    elif isinstance(node, str):
        yield node


def _command_sources() -> Iterator[tuple[str, list[str]]]:
    """(file, tokens) of every command line in infra/: the README's code blocks, the YAML files'
    strings and exec-form lists, and the Dockerfile's RUN/CMD/ENTRYPOINT."""
    for block in _code_blocks(INFRA_README.read_text()):
        for tokens in _split_shell(block):
            yield "infra/README.md", tokens
    for path in [*COMPOSE_FILES, *MANIFESTS]:
        for doc in _docs(path):
            for s in _strings(doc):
                if isinstance(s, list):
                    yield str(path.relative_to(ROOT)), s
                    continue
                for tokens in _split_shell(s):
                    yield str(path.relative_to(ROOT)), tokens
    for word, rest in _dockerfile():
        if word in ("RUN", "CMD", "ENTRYPOINT"):
            if rest.startswith("["):
                yield "infra/Dockerfile", json.loads(rest)
            else:
                for tokens in _split_shell(rest):
                    yield "infra/Dockerfile", tokens


def _chemmap_invocations() -> list[tuple[str, list[str]]]:
    """(file, arguments after `chemmap`) of every `chemmap ...` command in infra/."""
    found = []
    for where, tokens in _command_sources():
        for i, tok in enumerate(tokens):
            is_cli = tok == "chemmap" or tok.endswith("bin/chemmap")
            # Not an option's value (`-n chemmap`), nor a bare name (a label, Compose's project).
            after_option = i > 0 and tokens[i - 1].startswith("-") and tokens[i - 1] != "--"
            if is_cli and not after_option and tokens[i + 1 :]:
                found.append((where, tokens[i + 1 :]))
                break
    return found


def _cli() -> Any:
    """The real CLI as click sees it (Typer's own copy of click: duck-typed below)."""
    return typer.main.get_command(app)


def _resolve(args: list[str]) -> tuple[Any, list[str], list[str]]:
    """The command ``chemmap <args>`` runs, its path, and the remaining arguments; AssertionError
    naming the command if the real CLI has no such command."""
    cmd = _cli()
    path = ["chemmap"]
    args = list(args)
    while hasattr(cmd, "commands") and args and not args[0].startswith("-"):  # a group
        name = args.pop(0)
        sub = cmd.commands.get(name)
        assert sub is not None, f"`{' '.join([*path, name])}`: no such command (has: {sorted(cmd.commands)})"
        cmd, path = sub, [*path, name]
    return cmd, path, args


def _options(cmd: Any) -> dict[str, Any]:
    return {o: p for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")}


def _parse(cmd: Any, args: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """(positional arguments, option -> values) of ``args`` for ``cmd``; unknown options fail."""
    opts = _options(cmd)
    positional: list[str] = []
    values: dict[str, list[str]] = {}
    it = iter(args)
    for a in it:
        if a == "--":
            positional.extend(it)
            break
        if a.startswith("-") and a != "-":
            name, eq, value = a.partition("=")
            assert name in opts or name == "--help", f"{cmd.name}: no option {name} (has: {sorted(opts)})"
            param = opts.get(name)
            takes_value = param is not None and param.param_type_name == "option" and not param.is_flag
            takes_value = takes_value and not param.count
            if takes_value and not eq:
                value = next(it)
            key = param.name if param is not None else name
            values.setdefault(key, []).append(value)
        else:
            positional.append(a)
    return positional, values


def _config_path(arg: str) -> Path:
    """A config path as a command names it: relative to the repository root, or inside the image."""
    app_dir = _app_dir().rstrip("/") + "/"
    return ROOT / arg.removeprefix(app_dir) if arg.startswith(app_dir) else ROOT / arg


def test_the_files_name_chemmap_commands():
    commands = {tuple(args[:1]) for _, args in _chemmap_invocations()}
    assert {("run",), ("submit",), ("jobs",), ("score",)} <= commands


@pytest.mark.parametrize(
    "where,args", _chemmap_invocations(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:2])
)
def test_every_chemmap_command_in_infra_exists(where: str, args: list[str]):
    """The command (and sub-command) is registered in the real Typer app, its options exist, and
    the config it names loads with its --set overrides."""
    cmd, path, rest = _resolve(args)
    positional, values = _parse(cmd, rest)
    arguments = [p for p in cmd.params if p.param_type_name == "argument"]
    config = None
    if arguments and arguments[0].name == "config" and positional:
        config = positional[0]
    elif values.get("config"):
        config = values["config"][0]
    if config is not None:
        path_ = _config_path(config)
        assert path_.is_file(), f"{where}: `{' '.join(path)}` names {config}, which is not in the repository"
        load_config(path_, values.get("set_", []))


def test_config_files_named_in_infra_exist():
    pattern = re.compile(r"(?P<prefix>/[\w./-]*/)?(?P<rel>(?:pipelines|configs)/[\w.-]+\.ya?ml)")
    texts = {p: p.read_text() for p in [*COMPOSE_FILES, *MANIFESTS, INFRA_README, DOCKERFILE]}
    named = [(p, m) for p, text in texts.items() for m in pattern.finditer(text)]
    assert named
    for p, m in named:
        assert (ROOT / m["rel"]).is_file(), f"{p.name} names {m['rel']}, which is not in the repository"
        if m["prefix"]:  # inside the image: where the Dockerfile puts the repository's files
            assert m["prefix"].rstrip("/") == _app_dir(), f"{p.name}: {m.group(0)} is not under {_app_dir()}"
    copied = " ".join(_instructions("COPY"))
    assert "pipelines ./pipelines" in copied and "configs ./configs" in copied


def test_infra_paths_named_in_infra_exist():
    """`infra/...` paths in the files (Dockerfile, compose files, manifests) exist; infra/.env is the
    user's copy of env.example (git-ignored)."""
    user_made = {"infra/.env"}
    for p in [*COMPOSE_FILES, *MANIFESTS, INFRA_README, DOCKERFILE, INFRA / "env.example"]:
        for rel in re.findall(r"infra/[\w./-]*[\w]", p.read_text()):
            assert rel in user_made or (ROOT / rel).exists(), f"{p.name} names {rel}, which does not exist"
    assert ".env" in (INFRA / ".gitignore").read_text().splitlines()


# --------------------------------------------------------------------------- parsing and KubeRay fields


@pytest.mark.parametrize("path", [*COMPOSE_FILES, *MANIFESTS], ids=lambda p: p.name)
def test_every_manifest_and_compose_file_parses(path: Path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    if path.parent == K8S:
        for d in docs:
            assert {"apiVersion", "kind", "metadata"} <= d.keys(), f"{path.name}: {d.get('kind')}"


def test_raycluster_has_kuberays_required_fields_and_gpu_workers():
    cluster = _one("RayCluster")
    assert cluster["apiVersion"] == "ray.io/v1"
    for spec in _ray_cluster_specs():
        head = spec["headGroupSpec"]
        assert isinstance(head["rayStartParams"], dict)
        assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
        assert head["template"]["spec"]["containers"]
        groups = spec["workerGroupSpecs"]
        assert isinstance(groups, list) and groups
        for g in groups:
            assert (
                g["groupName"]
                and isinstance(g["rayStartParams"], dict)
                and g["template"]["spec"]["containers"]
            )
            assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        gpus = [
            int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
            for g in groups
            for c in g["template"]["spec"]["containers"]
        ]
        assert max(gpus) >= 1, "no worker group asks for nvidia.com/gpu"
        ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
        assert ports == {
            "gcs-server": RAY_GCS_PORT,
            "dashboard": RAY_DASHBOARD_PORT,
            "client": RAY_CLIENT_PORT,
        }


def test_rayjob_runs_the_paper_pipeline_against_the_clusters_services():
    job = _one("RayJob")
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["rayClusterSpec"] == _one("RayCluster")["spec"]  # one cluster spec, kept in two files

    tokens = shlex.split(spec["entrypoint"])
    assert tokens[:2] == ["chemmap", "run"]
    cmd, _, rest = _resolve(tokens[1:])
    positional, values = _parse(cmd, rest)
    config_path = _config_path(positional[0])
    assert config_path == ROOT / "pipelines" / "pork_belly_paper.yaml"
    cfg = load_config(config_path, values["set_"])

    assert cfg.cluster.ray_address == "auto"  # join the job's cluster
    assert cfg.cluster.storage_path.startswith("s3://")  # checkpoints every node can reach
    mlflow = _one("Service", "mlflow")
    assert cfg.tracking_uri == f"http://mlflow:{mlflow['spec']['ports'][0]['port']}"
    # The workdir is on the shared volume of every Ray pod (a job's working dir vanishes).
    assert cfg.workdir.startswith(SHARED_MOUNT + "/")
    for pod in _ray_pod_specs(spec["rayClusterSpec"]):
        claims = {
            v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in pod["volumes"]
            if "persistentVolumeClaim" in v
        }
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c["volumeMounts"]}
        claim = claims[mounts[SHARED_MOUNT]]
        pvc = _one("PersistentVolumeClaim", claim)
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]

    # Enough GPUs for the paper's Ray Train workers.
    assert cfg.train.use_gpu
    per_worker = (cfg.cluster.resources_per_worker or {}).get("GPU", 1)
    have = sum(
        g["replicas"] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
        for g in spec["rayClusterSpec"]["workerGroupSpecs"]
        for c in g["template"]["spec"]["containers"]
    )
    assert have >= cfg.train.num_workers * per_worker


def test_every_chemmap_workdir_override_is_on_the_shared_volume():
    """A Ray job's working directory vanishes: every submitted run writes to the shared mount,
    which the Compose Ray nodes and the KubeRay pods mount at the same path."""
    overrides = [
        a.partition("=")[2] for _, args in _chemmap_invocations() for a in args if a.startswith("workdir=")
    ]
    assert overrides
    assert all(w.startswith(SHARED_MOUNT + "/") for w in overrides), overrides
    services = _compose()["services"]
    for name in ("ray-head", "ray-worker"):
        assert any(v.split(":")[1] == SHARED_MOUNT for v in services[name]["volumes"]), name
    for c in _ray_containers():
        assert SHARED_MOUNT in {m["mountPath"] for m in c["volumeMounts"]}, c["name"]


# --------------------------------------------------------------------------- token authentication


def test_every_ray_node_requires_the_token_from_a_secret():
    for spec in _ray_cluster_specs():
        auth = spec["authOptions"]
        assert auth["mode"] == "token"
        secret = auth["secretName"]
        for pod in _ray_pod_specs(spec):
            for c in pod["containers"]:
                env = _env(c)
                assert env[RAY_AUTH_MODE]["value"] == "token", c["name"]
                ref = env[RAY_AUTH_TOKEN]["valueFrom"]["secretKeyRef"]
                assert ref == {"name": secret, "key": KUBERAY_TOKEN_KEY}, c["name"]
    for name in ("ray-head", "ray-worker"):
        env = _compose()["services"][name]["environment"]
        assert env[RAY_AUTH_MODE] == "token"
        assert env[RAY_AUTH_TOKEN].startswith("${RAY_AUTH_TOKEN"), "the token comes from infra/.env"
    assert re.search(rf"^{RAY_AUTH_TOKEN}=$", (INFRA / "env.example").read_text(), flags=re.M)


def test_no_credential_is_written_in_a_file():
    """Credentials come from Secrets (Kubernetes) or infra/.env (Compose), never as values."""
    for pod in _pod_specs():
        for c in pod["containers"]:
            for name, e in _env(c).items():
                if SECRETISH.search(name):
                    assert "secretKeyRef" in e.get("valueFrom", {}), (
                        f"{c['name']}: {name} is not from a Secret"
                    )
                if "value" in e and "://" in e["value"] and "@" in e["value"]:  # a URL with userinfo
                    userinfo = e["value"].split("://", 1)[1].split("@", 1)[0]
                    assert re.fullmatch(r"(\$\(\w+\):?)+", userinfo), (
                        f"{c['name']}: {name} has a literal password"
                    )
    for path in COMPOSE_FILES:
        for svc, body in (yaml.safe_load(path.read_text()).get("services") or {}).items():
            for name, value in (body.get("environment") or {}).items():
                if SECRETISH.search(name):
                    assert str(value).startswith("${"), f"{path.name} {svc}: {name} is written in the file"
                if "://" in str(value) and "@" in str(value):
                    userinfo = str(value).split("://", 1)[1].rsplit("@", 1)[0]
                    password = userinfo.partition(":")[2]
                    assert password.startswith("${"), f"{path.name} {svc}: {name} has a literal password"
    for line in (INFRA / "env.example").read_text().splitlines():
        if SECRETISH.search(line.partition("=")[0]) and not line.startswith("#"):
            assert line.endswith("="), f"env.example gives a value: {line}"


def test_every_secret_the_manifests_use_is_created_in_the_readme():
    used: dict[str, set[str]] = {}
    for spec in _ray_cluster_specs():
        used.setdefault(spec["authOptions"]["secretName"], set()).add(KUBERAY_TOKEN_KEY)
    for pod in _pod_specs():
        for c in pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    used.setdefault(ref["name"], set()).add(ref["key"])
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    used.setdefault(src["secretRef"]["name"], set())
    created: dict[str, set[str]] = {}
    for block in _code_blocks(INFRA_README.read_text()):
        text = re.sub(r"\\\n", " ", block)
        for m in re.finditer(r"kubectl create secret generic ([\w-]+)(.*)", text):
            created[m[1]] = set(re.findall(r"--from-(?:literal|file)=(\w+)=", m[2]))
    for name, keys in used.items():
        assert name in created, f"Secret {name} is used but infra/README.md never creates it"
        assert keys <= created[name], f"Secret {name}: README creates {created[name]}, manifests read {keys}"


# --------------------------------------------------------------------------- MLflow, Compose, ports


def _flag(tokens: list[str], name: str) -> str | None:
    for i, t in enumerate(tokens):
        if t == name:
            return tokens[i + 1]
        if t.startswith(name + "="):
            return t.split("=", 1)[1]
    return None


def _mlflow_port() -> int:
    """The MLflow server's port, as the Kubernetes Deployment starts it."""
    (c,) = _one("Deployment", "mlflow")["spec"]["template"]["spec"]["containers"]
    return int(_flag(c["command"] + c.get("args", []), "--port"))


def _allowed(hosts: str, host_header: str) -> bool:
    from mlflow.server.security_utils import is_allowed_host_header

    return is_allowed_host_header([h.strip() for h in hosts.split(",")], host_header)


def test_the_mlflow_server_uses_postgres_and_s3():
    port = _mlflow_port()
    deployment = _one("Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    argv = c["command"] + c.get("args", [])
    assert argv[:2] == ["mlflow", "server"] and _flag(argv, "--host") == "0.0.0.0"
    assert "--serve-artifacts" in argv and _flag(argv, "--artifacts-destination").startswith("s3://")
    assert c["image"] == _image_tag()
    backend = _env(c)["MLFLOW_BACKEND_STORE_URI"]["value"]
    assert backend.startswith("postgresql://") and backend.endswith(f"@postgres:{POSTGRES_PORT}/mlflow")
    assert _one("Service", "postgres")["spec"]["ports"][0]["port"] == POSTGRES_PORT
    (pg,) = _one("StatefulSet", "postgres")["spec"]["template"]["spec"]["containers"]
    assert pg["ports"][0]["containerPort"] == POSTGRES_PORT
    for kind, name in (("Service", "mlflow"), ("Service", "postgres")):
        svc = _one(kind, name)
        workload = _one("Deployment" if name == "mlflow" else "StatefulSet", name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= labels.items(), f"Service {name} selects no pod"
    svc_port = _one("Service", "mlflow")["spec"]["ports"][0]
    assert svc_port["port"] == svc_port["targetPort"] == port == c["ports"][0]["containerPort"]
    assert c["readinessProbe"]["httpGet"]["port"] == port
    # The Host header a client of http://mlflow:<port> sends passes MLflow's own check.
    assert _allowed(_flag(argv, "--allowed-hosts"), f"mlflow:{port}")
    assert _allowed(_flag(argv, "--allowed-hosts"), f"localhost:{port}")  # a port-forward

    mlflow = _compose()["services"]["mlflow"]
    tokens = shlex.split(mlflow["command"])
    assert tokens[:2] == ["mlflow", "server"] and int(_flag(tokens, "--port")) == port
    assert _flag(tokens, "--artifacts-destination").startswith("s3://")
    assert _allowed(_flag(tokens, "--allowed-hosts"), f"mlflow:{port}")
    assert _allowed(_flag(tokens, "--allowed-hosts"), f"localhost:{port}")
    assert mlflow["environment"]["MLFLOW_BACKEND_STORE_URI"].endswith(f"@postgres:{POSTGRES_PORT}/mlflow")


def test_the_compose_cluster_has_its_services_on_the_right_ports():
    services = _compose()["services"]
    assert {"ray-head", "ray-worker", "mlflow", "postgres", "minio"} <= services.keys()
    head = shlex.split(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    assert int(_flag(head, "--port")) == RAY_GCS_PORT
    assert int(_flag(head, "--dashboard-port")) == RAY_DASHBOARD_PORT
    assert _flag(head, "--dashboard-host") == "0.0.0.0"
    assert int(_flag(head, "--ray-client-server-port")) == RAY_CLIENT_PORT
    worker = shlex.split(services["ray-worker"]["command"])
    assert worker[:2] == ["ray", "start"] and "--block" in worker
    assert _flag(worker, "--address") == f"ray-head:{RAY_GCS_PORT}"
    minio = shlex.split(services["minio"]["command"])
    assert minio[:2] == ["server", "/data"] and _flag(minio, "--address") == f":{MINIO_PORT}"

    # Published ports: on loopback only, each to the port its service listens on.
    listens = {
        "ray-head": {RAY_DASHBOARD_PORT, RAY_CLIENT_PORT},
        "mlflow": {_mlflow_port()},
        "minio": {MINIO_PORT, int(_flag(minio, "--console-address").lstrip(":"))},
    }
    for name, body in services.items():
        for mapping in body.get("ports", []):
            ip, _, container_port = str(mapping).split(":")
            assert ip == "127.0.0.1", f"{name} publishes {mapping} beyond this machine"
            assert int(container_port) in listens[name], f"{name}: {mapping}"


def test_dockerfile_exposes_the_ports_the_services_use():
    exposed = {int(p) for line in _instructions("EXPOSE") for p in line.split()}
    assert exposed == {RAY_GCS_PORT, RAY_DASHBOARD_PORT, RAY_CLIENT_PORT, _mlflow_port()}


def _published_ports() -> dict[int, str]:
    """Ports on this machine: Compose's published ports and the README's port-forwards."""
    out = {}
    for name, body in _compose()["services"].items():
        for mapping in body.get("ports", []):
            out[int(str(mapping).split(":")[1])] = name
    for block in _code_blocks(INFRA_README.read_text()):
        for service, local, remote in re.findall(r"port-forward service/([\w-]+) (\d+):(\d+)", block):
            out[int(local)] = service
            if service.endswith("-head-svc"):
                assert int(remote) == RAY_DASHBOARD_PORT, f"port-forward to {service}:{remote}"
            else:
                assert int(remote) == _one("Service", service)["spec"]["ports"][0]["port"], service
    return out


def test_every_url_in_the_files_uses_its_services_port():
    """URLs in infra/, README.md, pipelines/ and configs/: ray:// on Ray's client port, MLflow,
    MinIO and Postgres on theirs, `--address` on the dashboard, localhost on a published port."""
    files = [
        *COMPOSE_FILES,
        *MANIFESTS,
        INFRA_README,
        DOCKERFILE,
        ROOT / "README.md",
        *ROOT.glob("pipelines/*.yaml"),
        *ROOT.glob("configs/*.yaml"),
    ]
    # Outside infra/ a URL may name other machines (a local head, a scheduler): only the URLs of
    # the services above are held to their ports there.
    url = re.compile(r"(?P<scheme>[a-z][a-z0-9+]*)://(?:[^\s/@'\"`]*@)?(?P<host>[\w.-]+):(?P<port>\d+)")
    published = _published_ports()
    port_of = {"mlflow": _mlflow_port(), "minio": MINIO_PORT, "postgres": POSTGRES_PORT}
    checked = 0
    for path in files:
        text = re.sub(r"\$\{[^}]*\}|\$\(\w+\)", "X", path.read_text())  # ${VAR:?...}, $(VAR) -> X
        addresses = set(re.findall(r"--address[= ](\S+)", text))
        for m in url.finditer(text):
            scheme, host, port = m["scheme"], m["host"], int(m["port"])
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            service = next((s for s in port_of if s in host), None)
            if scheme == "ray":
                assert port == RAY_CLIENT_PORT, where
            elif m.group(0) in addresses or host == "HOST":
                assert port == RAY_DASHBOARD_PORT, where
            elif service is not None:
                assert port == port_of[service], where
            elif scheme == "tcp" and "scheduler" in host:
                assert port == DASK_SCHEDULER_PORT, where
            elif INFRA not in path.parents:
                continue
            elif host in ("localhost", "127.0.0.1"):
                assert port in published, f"{where}: nothing is published on {port}"
            else:
                pytest.fail(f"{where}: a URL whose service this test does not know")
            checked += 1
    assert checked >= 10


# --------------------------------------------------------------------------- the image


def test_one_image_built_from_the_dockerfile_everywhere():
    tag = _image_tag()
    assert tag == f"chemmap:{_version()}"
    services = _compose()["services"]
    built = [n for n, b in services.items() if b.get("build", {}).get("dockerfile") == "infra/Dockerfile"]
    assert {"ray-head", "ray-worker", "mlflow"} <= set(built)
    for name in built:
        assert services[name]["image"] == tag, name
        assert services[name]["build"]["context"] == ".."  # the repository root
    for c in _ray_containers():
        assert c["image"] == tag, c["name"]
    readme = INFRA_README.read_text()
    assert f"docker build -f infra/Dockerfile -t {tag} ." in readme
    for sed in re.findall(r'sed "s\|image: ([^|]+)\|', readme):
        assert sed == tag  # the README's registry rewrite finds the manifests' image


def test_the_dockerfile_builds_chemmap_on_cuda_torch_as_a_non_root_user():
    import mlflow
    import ray
    import torch

    (base,) = re.findall(r"ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text())
    m = re.fullmatch(r"pytorch/pytorch:(?P<torch>[\d.]+)-cuda[\d.]+-cudnn\d+-(runtime|devel)", base)
    assert m, f"not a CUDA PyTorch base image: {base}"
    assert m["torch"] == torch.__version__.split("+")[0]  # the torch chemmap is tested with
    assert _instructions("FROM") == ["${BASE_IMAGE}"]

    runs = " ".join(_instructions("RUN"))
    assert "pip install ." in runs
    assert f'"ray[train,default]=={ray.__version__}"' in runs
    assert f'"mlflow=={mlflow.__version__}"' in runs
    for spec in _ray_cluster_specs():
        assert spec["rayVersion"] == ray.__version__

    (user,) = _instructions("USER")
    assert user not in ("root", "0") and re.search(rf"useradd .*--uid (\d+) .*{user}\b", runs)
    uid = int(re.search(rf"useradd .*--uid (\d+) .*{user}\b", runs)[1])
    for pod in _pod_specs():
        ctx = pod.get("securityContext")
        if ctx is not None and "runAsUser" in ctx:
            assert ctx["runAsUser"] == uid and ctx["runAsNonRoot"] is True
    for c in _ray_containers():
        assert c["image"] == _image_tag()
