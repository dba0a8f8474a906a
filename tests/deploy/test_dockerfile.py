"""The Dockerfile: hadolint, and the rules hadolint does not check (no Docker engine runs here,
so the image itself is not built in CI)."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy._support import ROOT, run, tool

DOCKERFILE = ROOT / "Dockerfile"


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


def parse(text: str) -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    buffer, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buffer and (not line or line.startswith("#")):
            continue
        if buffer and line.startswith("#"):
            continue
        if not buffer:
            start = number
        buffer += " " + line.removesuffix("\\").strip() if buffer else line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            keyword, _, args = buffer.partition(" ")
            out.append(Instruction(start, keyword.upper(), args.strip()))
            buffer = ""
    return out


INSTRUCTIONS = parse(DOCKERFILE.read_text())


def of(keyword: str) -> list[Instruction]:
    return [i for i in INSTRUCTIONS if i.keyword == keyword]


def stages() -> dict[str, tuple[str, list[Instruction]]]:
    """Each stage by name: (what it is FROM, its own instructions)."""
    out: dict[str, tuple[str, list[Instruction]]] = {}
    current: list[Instruction] = []
    for instruction in INSTRUCTIONS:
        if instruction.keyword == "FROM":
            base, _, name = instruction.args.partition(" AS ")
            current = []
            out[name.strip() or f"#{len(out)}"] = (base.strip(), current)
        current.append(instruction)
    return out


STAGES = stages()
# the images users build: `docker build --target serving .` and `docker build .` (full)
TARGETS = ("serving", "full")


def effective(stage: str) -> list[Instruction]:
    """A stage's instructions including those of the stages it is built FROM, base first."""
    base, own = STAGES[stage]
    return (effective(base) if base in STAGES else []) + own


def installed_by(target: str) -> list[str]:
    """Every `pip install` of the build stages whose /opt/modelloop the target copies."""
    copies = [i.args for i in effective(target) if i.keyword == "COPY" and "/opt/modelloop" in i.args]
    builds = {m.group(1) for c in copies if (m := re.search(r"--from=(\S+)", c))}
    runs = [i.args for b in builds for i in effective(b) if i.keyword == "RUN"]
    return [r for r in runs if "pip install" in r]


def final_stage() -> list[Instruction]:
    return effective(list(STAGES)[-1])


def test_hadolint() -> None:
    result = run([tool("hadolint"), str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_parser_joins_continuations() -> None:
    parsed = parse("# c\nFROM a:1 AS b\nRUN x \\\n  # inside\n  && y\nUSER 1\n")
    assert [(i.line, i.keyword, i.args) for i in parsed] == [
        (2, "FROM", "a:1 AS b"), (3, "RUN", "x && y"), (6, "USER", "1"),
    ]


def test_base_images_are_pinned_and_runtime_is_cuda() -> None:
    args = {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=?(\S*)", DOCKERFILE.read_text(), re.M)}
    images = [i.args.split()[0] for i in of("FROM") if i.args.split()[0] not in STAGES]
    assert len(of("FROM")) >= 2, "multi-stage: build stages and runtime stages"
    for image in images:
        if image == "scratch":
            continue
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and "$" not in tag, f"unpinned base image {image}"
        assert name not in args
    for target in TARGETS:
        root = effective(target)[0].args.split()[0]
        assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu2[24]\.04", root), target
        assert any("--from=build" in i.args for i in effective(target) if i.keyword == "COPY")


def test_the_targets_and_full_is_the_default() -> None:
    assert set(TARGETS) <= set(STAGES)
    # `docker build .` builds the last stage: the full image, as before there were two
    assert list(STAGES)[-1] == "full"


@pytest.mark.parametrize("target", TARGETS)
def test_runs_as_a_numeric_non_root_user(target: str) -> None:
    users = [i.args for i in effective(target) if i.keyword == "USER"]
    assert users, "the runtime stage never leaves root"
    uid = users[-1].split(":")[0]
    # numeric, so Kubernetes' runAsNonRoot can verify it without a passwd lookup
    assert uid.isdigit() and int(uid) != 0


@pytest.mark.parametrize("target", TARGETS)
def test_healthcheck_probes_through_the_entrypoint(target: str) -> None:
    (check,) = [i for i in effective(target) if i.keyword == "HEALTHCHECK"]
    assert "CMD" in check.args and "healthcheck" in check.args
    assert re.search(r"--start-period=\d+s", check.args), "model loading needs a start period"


@pytest.mark.parametrize("target", TARGETS)
def test_entrypoint_selects_the_role_and_defaults_to_serving(target: str) -> None:
    (entrypoint,) = [i for i in effective(target) if i.keyword == "ENTRYPOINT"]
    assert entrypoint.args == '["tini", "--", "modelloop-entrypoint"]'
    assert [i for i in effective(target) if i.keyword == "CMD"][-1].args == '["serve"]'


@pytest.mark.parametrize("target", TARGETS)
def test_each_target_tells_the_entrypoint_what_it_is(target: str) -> None:
    # deploy/docker/entrypoint.sh refuses monitor/retrain/bootstrap where this says serving
    envs = [i.args for i in STAGES[target][1] if i.keyword == "ENV"]
    assert f"MODELLOOP_IMAGE_TARGET={target}" in envs


def test_the_serving_image_installs_the_serving_extra_only() -> None:
    (install,) = installed_by("serving")
    assert re.search(r"pip install \"\.\[serving\]\"", install), install
    # no torch, no Evidently: neither the training nor the monitoring extra, nor all
    for forbidden in ("torch", "training", "monitoring", "[all]", "TORCH_"):
        assert forbidden not in install, forbidden
    build_stages = {m.group(1) for i in effective("serving") if i.keyword == "COPY"
                    for m in [re.search(r"--from=(\S+)", i.args)] if m}
    for stage in build_stages & set(STAGES):
        text = " ".join(i.args for i in effective(stage))
        assert "torch" not in text.lower(), f"stage {stage} mentions torch"


def test_the_full_image_installs_cpu_torch_first_then_everything() -> None:
    torch_install, all_install = installed_by("full")
    assert '"${TORCH_SPEC}"' in torch_install and '--index-url "${TORCH_INDEX_URL}"' in torch_install
    assert re.search(r"pip install \"\.\[all\]\"", all_install), all_install
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert set(extras["all"][0].partition("[")[2].rstrip("]").split(",")) == {
        "serving", "monitoring", "training"}


@pytest.mark.parametrize("target", TARGETS)
def test_the_installed_cli_is_run_at_build_time(target: str) -> None:
    # an import error of the installed package fails the build, not the first container start
    assert "modelloop --version" in installed_by(target)[-1]


def test_no_add_of_urls_and_apt_cleaned_in_the_same_layer() -> None:
    assert not [i for i in INSTRUCTIONS if i.keyword == "ADD"], "use COPY (ADD fetches URLs, unpacks)"
    for run_ in of("RUN"):
        if "apt-get install" in run_.args:
            assert "--no-install-recommends" in run_.args, f"line {run_.line}"
            assert "rm -rf /var/lib/apt/lists/*" in run_.args, f"line {run_.line}: apt lists kept"
        if "pip install" in run_.args:
            # PIP_NO_CACHE_DIR in the build stage's ENV
            assert any("PIP_NO_CACHE_DIR=1" in e.args for e in of("ENV"))


def test_torch_is_the_cpu_wheel_and_onnxruntime_is_the_gpu_build() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r'ARG TORCH_INDEX_URL="\S+/whl/cpu"', text)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.startswith("onnxruntime-gpu") for d in deps)
    assert not any(re.match(r"onnxruntime[<>=! ]", d) for d in deps), "CPU and GPU builds clash"


# ----------------------------------------------------------------------------- build context
def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
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


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; a pattern matching a folder
    matches what is inside it."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    result = False
    for raw in patterns:
        negated = raw.startswith("!")
        regex = _pattern_regex(raw.removeprefix("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            result = not negated
    return result


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("modelloop/registry.py", False),  # re-included folder
        ("modelloop/__pycache__/registry.cpython-311.pyc", True),  # ** pattern inside it
        (".venv/bin/python", True),  # everything else is out
        ("tests/deploy/test_dockerfile.py", True),
        ("deploy/docker/entrypoint.sh", False),  # a single file re-included
        ("deploy/prometheus/prometheus.yml", True),
    ],
)
def test_dockerignore_matching(path: str, expected: bool) -> None:
    assert ignored(path, dockerignore()) is expected


def test_copy_sources_exist_and_are_in_the_build_context() -> None:
    patterns = dockerignore()
    for copy in of("COPY"):
        if "--from=" in copy.args:
            continue
        *sources, _dest = copy.args.split()
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"COPY {source}: missing"
            files = [path] if path.is_file() else [p for p in path.rglob("*.py")]
            assert files
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if "__pycache__" not in rel:
                    assert not ignored(rel, patterns), f"{rel} is excluded by .dockerignore"


def test_every_python_package_is_copied_into_the_image() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    copied = {c.args.split()[0] for c in of("COPY") if "--from=" not in c.args}
    assert set(packages) <= copied
    readme = pyproject["project"]["readme"]
    assert any(readme in c.args for c in of("COPY")), "pip install . needs the readme"


def test_entrypoint_script_is_executable() -> None:
    assert (ROOT / "deploy/docker/entrypoint.sh").stat().st_mode & 0o111
    assert Path(ROOT / "deploy/docker/entrypoint.sh").read_text().startswith("#!/usr/bin/env bash")
