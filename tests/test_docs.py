"""The README and docs/ stay honest: size, links, and CLI flags that exist.

Fast (no export): it reads the Markdown and builds the argparse parsers.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_LIMIT = 8500  # bytes; the user guide target is ~8 KB (measurements live in docs/)
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
FLAG = re.compile(r"(?<![\w-])(--[A-Za-z][\w-]*|-[A-Za-z])(?![\w-])")
# A command's program: the angle-export / angle-rt scripts, or `python -m training.fit` /
# `.evaluate`.
PROGRAM = re.compile(
    r"(?:^|[\s/])(angle-export|angle-rt|-m\s+training\.(?:fit|evaluate))(?=\s|$)")
# pages whose `option` tables document angle-rt's subcommands
OPTION_PAGES = {"serving.md": "angle-rt", "scale-out.md": "angle-rt"}


def page_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def without_code(text: str) -> str:
    """Markdown with fenced blocks and inline code removed (links inside code are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = re.sub(r"[^\w\- ]", "", text.lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", path.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def relative_links(path: Path) -> Iterator[str]:
    for target in LINK.findall(without_code(path.read_text(encoding="utf-8"))):
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
            yield target


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of `parser` and, recursively, of its subcommands."""
    found = set()
    for action in parser._actions:
        found.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= option_strings(sub)
    return found


def commands(page: Path) -> Iterator[tuple[str, str]]:
    """(program, argument text) for each command in the page's fenced code blocks."""
    for block in FENCE.findall(page.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)  # shell comment
            for segment in re.split(r"&&|\|\||[;|]", line):
                match = PROGRAM.search(segment)
                if match:
                    program = match.group(1).replace("-m", "").split()[-1]
                    yield program, segment[match.end():]


def flag_tables(page: Path) -> Iterator[tuple[str, str]]:
    """(program, first cell) for each row of a table whose header starts with `flag`
    (training.fit under a heading that names it, else angle-export) or, on the angle-rt
    pages, with `option`."""
    program, header = "angle-export", False
    for line in FENCE.sub("", page.read_text(encoding="utf-8")).splitlines():
        if HEADING.match(line):
            program = "training.fit" if "training.fit" in line else "angle-export"
        if not line.startswith("|"):
            header = False
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip("|"))]
        if not header and cells[0].lower() == "option" and page.name in OPTION_PAGES:
            program, header = OPTION_PAGES[page.name], True
        elif not header and cells[0].lower() == "flag":
            header = True
        elif header and not set(cells[0]) <= set("-: "):
            yield program, cells[0]


def mentioned_flags() -> dict[str, set[tuple[str, str]]]:
    """Program → {(flag, page)} over every page's commands and flag tables."""
    found: dict[str, set[tuple[str, str]]] = {}
    for page in PAGES:
        for program, text in [*commands(page), *flag_tables(page)]:
            for flag in FLAG.findall(text):
                found.setdefault(program, set()).add((flag, page_id(page)))
    return found


@pytest.fixture(scope="module")
def flags() -> dict[str, set[tuple[str, str]]]:
    return mentioned_flags()


def test_readme_is_a_short_guide() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT, f"README.md is {size} bytes (limit {README_LIMIT}): move "
    "detail into docs/"


def test_readme_opens_with_the_two_commands() -> None:
    first = FENCE.search(README.read_text(encoding="utf-8"))
    assert first is not None
    lines = [s.strip() for s in first.group(1).splitlines() if s.strip()]
    assert lines[0].startswith("make demo") and lines[1].startswith("make test"), lines[:2]


def test_docs_exist_and_readme_links_each() -> None:
    assert DOCS, "docs/*.md missing"
    linked = {(README.parent / t.split("#")[0]).resolve() for t in relative_links(README)}
    unlinked = [page_id(d) for d in DOCS if d.resolve() not in linked]
    assert not unlinked, f"README.md does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    assert not broken, f"{page_id(page)}: " + "; ".join(broken)


def test_option_strings_walks_subcommands() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top")
    sub = parser.add_subparsers().add_parser("build-engine")
    sub.add_argument("--precision")
    sub.add_subparsers().add_parser("deeper").add_argument("-x", "--deep")
    assert {"--top", "--precision", "--deep", "-x"} <= option_strings(parser)


def test_flag_extraction_finds_commands(flags: dict[str, set[tuple[str, str]]]) -> None:
    names = {p: {f for f, _ in found} for p, found in flags.items()}
    assert {"--model", "--fp16", "--int8", "-o"} <= names.get("angle-export", set())
    assert {"--train-data", "--cosine-w"} <= names.get("training.fit", set())


def test_angle_export_flags_exist(flags: dict[str, set[tuple[str, str]]]) -> None:
    from exporters import cli

    known = option_strings(cli.build_parser())
    if hasattr(cli, "build_engine_parser"):  # a separate parser until subcommands arrive
        known |= option_strings(cli.build_engine_parser())
    unknown = sorted(f"{flag} ({page})" for flag, page in flags["angle-export"]
                     if flag not in known)
    assert not unknown, f"angle-export has no such flags: {unknown}"


def test_angle_rt_flags_exist(flags: dict[str, set[tuple[str, str]]]) -> None:
    from angle_rt.cli import build_parser

    known = option_strings(build_parser())
    found = flags.get("angle-rt", set())
    assert {"--api-key", "--text-column", "--ray"} <= {f for f, _ in found}
    unknown = sorted(f"{flag} ({page})" for flag, page in found if flag not in known)
    assert not unknown, f"angle-rt has no such flags: {unknown}"


def test_training_fit_flags_exist(flags: dict[str, set[tuple[str, str]]]) -> None:
    from training.fit import build_parser

    known = option_strings(build_parser())
    unknown = sorted(f"{flag} ({page})" for flag, page in flags["training.fit"]
                     if flag not in known)
    assert not unknown, f"python -m training.fit has no such flags: {unknown}"


def test_training_evaluate_flags_exist(flags: dict[str, set[tuple[str, str]]]) -> None:
    from training import evaluate

    help_text = io.StringIO()
    with contextlib.redirect_stdout(help_text), pytest.raises(SystemExit):
        evaluate.main(["--help"])
    known = set(FLAG.findall(help_text.getvalue()))
    unknown = sorted(f"{flag} ({page})" for flag, page in flags.get("training.evaluate", ())
                     if flag not in known)
    assert not unknown, f"python -m training.evaluate has no such flags: {unknown}"


def _parses(parser: argparse.ArgumentParser, args: list[str]) -> str | None:
    """None if `parser` accepts `args`, else argparse's complaint."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            parser.parse_args(args)
    except SystemExit as exc:
        return err.getvalue().strip().splitlines()[-1] if exc.code else None
    return None


def test_documented_commands_parse_as_written() -> None:
    """Each documented angle-export / angle-rt / training.fit command line (shell variables and
    placeholders filled in) is accepted by the real parser: right flags, choices, arity."""
    import shlex

    from angle_rt.cli import build_parser as rt_parser
    from exporters import cli
    from training.fit import build_parser as fit_parser

    parsers = {"angle-export": cli.build_parser(), "training.fit": fit_parser(),
               "angle-rt": rt_parser()}
    bad = []
    for page in PAGES:
        for program, text in commands(page):
            if program not in parsers:
                continue
            text = re.sub(r'"?\$\{?\w+\}?"?', "x", text)  # $MODEL, "$OUT" → x
            args = [a for a in shlex.split(text) if a != "..."]
            if any(a.startswith("[") for a in args):
                continue  # a usage synopsis ([-o DIR] [flags]), not a command
            if program == "angle-export" and (not args or args[0] not in cli.SUBCOMMANDS):
                args = ["export", *args]
            problem = _parses(parsers[program], args)
            if problem and "required" not in problem:  # a fragment may omit --model
                bad.append(f"{page_id(page)}: {program} {text.strip()} → {problem}")
    assert not bad, "\n".join(bad)


def test_kubernetes_example_matches_the_server() -> None:
    """docs/serving.md's Deployment parses, probes the routes the server answers, and gives
    the pod longer than the server's graceful timeout; its args parse as `angle-rt`."""
    yaml = pytest.importorskip("yaml")
    from angle_rt.cli import build_parser

    text = (ROOT / "docs" / "serving.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S)]
    docs = [d for b in blocks for d in yaml.safe_load_all(b)]
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    assert any(d["kind"] == "Service" for d in docs)
    pod = deploy["spec"]["template"]["spec"]
    box = pod["containers"][0]
    assert box["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert box["livenessProbe"]["httpGet"]["path"] == "/health"
    args = build_parser().parse_args(box["args"])
    assert args.graceful_timeout < pod["terminationGracePeriodSeconds"]
    assert box["ports"][0]["containerPort"] == args.port
