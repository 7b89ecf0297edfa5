"""README.md, docs/ and benchmarks/*.md stay true: short guide, working links, real settings, copied figures.

What each test holds the pages to:

* README.md is a user's guide of at most 300 lines with exactly two quick-start commands, and
  the second is the command ``.ci/run`` runs;
* every relative markdown link in README.md, docs/ and benchmarks/*.md points to an existing
  file (and heading, for ``#anchor`` links), and every repository path they name in code
  spans exists;
* every dotted setting README.md and docs/ name (``pruner.target_sparsity``,
  ``hydra.launcher.partition``, ...) exists in some composed config of ``conf/``;
* every figure in README's headline tables is on the benchmark page it points to;
* README's "Add a pruner" example is the pruner ``tests/test_new_pruner.py`` runs.

docs/troubleshooting.md is checked by ``tests/test_bad_input.py`` (generated from its cases),
docs/export.md's serving snippet by ``tests/test_serving.py`` (it runs).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import DictConfig, OmegaConf

from conftest import CONF, ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").rglob("*.md"))
BENCHMARK_PAGES = sorted((ROOT / "benchmarks").glob("*.md"))
PAGES = [README, *DOCS, *BENCHMARK_PAGES]


def sections(text: str, level: str = "## ") -> dict[str, str]:
    """Heading (without the hashes) -> the text up to the next heading of the same or a higher level."""
    out, name, lines = {}, None, []
    depth = len(level.strip())
    for line in text.splitlines():
        m = re.match(r"(#+) (.*)", line)
        if m and len(m.group(1)) <= depth and not _in_fence(lines):
            if name is not None:
                out[name] = "\n".join(lines)
            name, lines = (m.group(2), []) if len(m.group(1)) == depth else (None, [])
            continue
        lines.append(line)
    if name is not None:
        out[name] = "\n".join(lines)
    return out


def _in_fence(lines: list[str]) -> bool:
    return sum(1 for line in lines if line.startswith("```")) % 2 == 1


def fenced(text: str, lang: str) -> list[str]:
    """The bodies of the ```lang code blocks of ``text``, in order."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, re.S | re.M)


def without_code(text: str) -> str:
    """``text`` without fenced code blocks (their ``#`` lines are no headings, their brackets no links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Every heading anchor of a markdown file (repeated headings get -1, -2, ...)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#+ (.*)$", without_code(path.read_text()), re.M):
        s = slug(heading)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


# ----------------------------------------------------------------------------- README as a guide
def test_readme_is_a_guide_of_at_most_300_lines():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move long parts to docs/"
    heads = set(sections(README.read_text()))
    for needed in ("Install", "Quick start", "Which pruner for which model", "What a run writes", "Resume",
                   "Export and predict", "Layout", "Add a pruner"):
        assert needed in heads, f"README.md lacks the section '## {needed}'"


def _steps(command: str) -> list[str]:
    """A shell command's steps (split on &&), with pip's -q left out and spaces normalised."""
    return [" ".join(w for w in step.split() if w != "-q") for step in command.split("&&")]


def test_quick_start_is_two_commands_and_ci_runs_the_second():
    quick = sections(README.read_text())["Quick start"]
    blocks = [b.strip() for b in fenced(quick, "bash")]
    assert len(blocks) == 2 and all("\n" not in b for b in blocks), blocks
    main, tests = (_steps(b) for b in blocks)
    assert main[:-1] == tests[:-1] and main[-1] == "python run.py model=bert pruner=top", main
    assert tests[-1].startswith("python -m pytest"), tests
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert len(ci) == 1, ci
    ci_steps = _steps(ci[0])
    assert ci_steps[-1] == tests[-1], (ci_steps, tests)
    it = iter(ci_steps)  # README's steps, in order, among CI's (CI may add its own, e.g. a linter)
    assert all(step in it for step in tests), (ci_steps, tests)


# ----------------------------------------------------------------------------- links and paths
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def links(path: Path) -> list[str]:
    """The targets of a markdown file's links (outside code blocks)."""
    return LINK.findall(without_code(path.read_text()))


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_relative_links_resolve(page: Path):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{target}: no {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            bad.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: " + "; ".join(bad)


def test_the_guide_links_every_docs_page():
    linked = set()
    for page in [README, *DOCS]:
        for target in links(page):
            file = target.partition("#")[0]
            if file:
                linked.add((page.parent / file).resolve())
    missing = [str(p.relative_to(ROOT)) for p in DOCS if p.resolve() not in linked]
    assert not missing, f"docs pages no page links to: {missing}"


REPO_PATH = re.compile(r"`((?:benchmarks|conf|docs|pipelines|pruners|serving|tests)/[\w/.-]*\w)`")


GUIDE_PAGES = [p for p in [README, *DOCS] if p.name != "troubleshooting.md"]  # that one names the tests' own files


@pytest.mark.parametrize("page", GUIDE_PAGES, ids=[str(p.relative_to(ROOT)) for p in GUIDE_PAGES])
def test_named_repository_paths_exist(page: Path):
    missing = [p for p in REPO_PATH.findall(page.read_text()) if not (ROOT / p).exists()
               and not p.startswith("benchmarks/results/frontier")]  # frontier.py writes them once it has run
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"


# ----------------------------------------------------------------------------- settings
GROUPS = ("pruner", "model", "data", "trainer", "callbacks", "logger", "export", "latency", "paths")
SETTING = re.compile(rf"(?<![\w./$-])((?:{'|'.join(GROUPS)}|hydra\.launcher|hydra\.sweeper)(?:\.\w+)+)(?![\w(])")
#: a match ending in one of these is a file name (``export.py``), not a setting
FILE_SUFFIXES = {"py", "md", "onnx", "json", "yaml", "ckpt", "png", "csv"}


def _keys(node, prefix: str = "") -> set[str]:
    """Every dotted key path of a config node (values left unresolved; lists are leaves)."""
    out = set()
    if isinstance(node, DictConfig):
        for key in node.keys():
            path = f"{prefix}.{key}" if prefix else str(key)
            out.add(path)
            out |= _keys(node._get_node(key), path)
    return out


def _composable_keys() -> set[str]:
    """Every key path of the shipped configs, over every option of every group (and the launchers)."""
    from hydra import compose, initialize_config_dir

    options = {g: sorted(p.stem for p in (CONF / g).glob("*.yaml"))
               for g in ("pruner", "model", "data", "logger", "trainer", "hparams_search", "experiment")}
    runs = [[]] + [[f"{g}={o}"] for g, opts in options.items() for o in opts]
    runs += [["model=dlrm", f"pruner={p}"] for p in ("d2s", "none")]
    runs += [[f"hydra/launcher={launcher}"] for launcher in ("joblib", "submitit_local", "submitit_slurm")]
    keys = set()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for overrides in runs:
            cfg = compose("config", overrides=["paths.output_dir=/tmp/litprune-docs", *overrides],
                          return_hydra_config=True)
            keys |= _keys(cfg)
    return keys


def test_every_setting_the_docs_name_exists():
    """A setting renamed or removed in the code fails here until README.md and docs/ follow."""
    keys = _composable_keys()
    assert "pruner.stages.tokens.target_sparsity" in keys and "hydra.launcher.partition" in keys  # the union is wide
    bad = {}
    for page in [README, *DOCS]:
        if page.name == "troubleshooting.md":  # generated; lists bad settings on purpose
            continue
        text = page.read_text()
        if page == README:  # the example pruner of "Add a pruner" does not ship (tests/test_new_pruner.py adds it)
            text = text.replace(sections(text)["Add a pruner"], "")
        for name in set(SETTING.findall(text)):
            if name.rsplit(".", 1)[1] in FILE_SUFFIXES:
                continue
            if name not in keys and not any(k.startswith(name + ".") for k in keys):
                bad.setdefault(str(page.relative_to(ROOT)), []).append(name)
    assert not bad, f"settings named in the docs that no config has: {bad}"


# ----------------------------------------------------------------------------- headline figures
def test_readme_headline_figures_are_on_their_benchmark_pages():
    """Each pruner's headline section copies its figures from the benchmark page it links to."""
    pruners = sections(sections(README.read_text())["Which pruner for which model"], "### ")
    checked = 0
    for name, text in pruners.items():
        pages = [t for t in links_in(text) if t.startswith("benchmarks/") and t.endswith(".md")]
        figures = set(re.findall(r"(?<![\w.])[+-]?\d+\.\d+x?", text))
        if not figures:
            continue
        assert pages, f"README's '{name}' gives figures but links no benchmark page"
        source = "".join((ROOT / p).read_text() for p in pages)
        missing = sorted(f for f in figures if f.lstrip("+") not in source)
        assert not missing, f"README's '{name}' has figures not on {pages}: {missing}"
        checked += 1
    assert checked >= 3  # ToP, SwiftPruner, D2S


def links_in(text: str) -> list[str]:
    """The targets of the links in a piece of markdown."""
    return LINK.findall(text)


# ----------------------------------------------------------------------------- adding a pruner
def test_add_a_pruner_example_is_the_pruner_the_test_runs():
    """Every line of README's example is in tests/test_new_pruner.py, and its YAML is the test's."""
    guide = sections(README.read_text())["Add a pruner"]
    test = (ROOT / "tests" / "test_new_pruner.py").read_text()
    test_lines = {line.rstrip() for line in test.splitlines()}
    (code,) = fenced(guide, "python")
    missing = [line for line in code.splitlines() if line.strip() and line.rstrip() not in test_lines]
    assert not missing, f"README's pruner example differs from tests/test_new_pruner.py: {missing}"
    assert "class KeepFirstHeads(Pruner):" in code
    (yaml,) = fenced(guide, "yaml")
    written = re.search(r'keep_first_heads\.yaml"\)\.write_text\("(.*?)"\)', test).group(1)
    assert OmegaConf.create(yaml) == OmegaConf.create(written.encode().decode("unicode_escape"))
