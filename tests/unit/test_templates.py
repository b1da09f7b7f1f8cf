"""The template registry on disk: what it keeps, what it refuses, what survives a restart."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from atropos_agent.errors import ArchiveRefused, TooLarge, UnknownTemplate
from atropos_agent.executor.settings import JournalSettings, WorkspaceSettings
from atropos_agent.executor.templates import Template, TemplateRegistry
from tests.workspace_support import HOSTILE, directory, file, symlink, tgz

GOOD = tgz(
    directory("src"),
    file("src/main.py", b"print(1)\n", 0o755),
    symlink("main", "src/main.py"),
    file(".atropos-layer.json.bak", b"a name that only looks like the reserved one"),
)


def registry(state_dir: Path, identity: str | None = "local-9001", **caps: int) -> TemplateRegistry:
    settings = WorkspaceSettings(
        JournalSettings(state_dir, identity),
        upload_max_bytes=caps.get("max_bytes", 1 << 20),
        upload_max_entries=caps.get("max_entries", 100),
    )
    opened = TemplateRegistry(settings)
    opened.open()
    return opened


async def chunks(data: bytes, size: int = 1000) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def add(templates: TemplateRegistry, name: str, data: bytes) -> Template:
    return asyncio.run(templates.add(name, chunks(data)))


def stored(templates: TemplateRegistry) -> list[str]:
    assert templates.directory is not None
    return sorted(p.name for p in templates.directory.iterdir() if p.name.endswith(".tar.gz"))


def test_a_template_is_kept_by_content_and_survives_a_new_registry(tmp_path: Path) -> None:
    templates = registry(tmp_path)
    template = add(templates, "repo", GOOD)
    sha = hashlib.sha256(GOOD).hexdigest()
    assert (template.sha256, template.bytes, template.entry_count) == (sha, len(GOOD), 4)
    assert template.layer_id == f"sha256-{sha}"
    assert templates.archive_of(template.layer_id) is not None
    add(templates, "same-content", GOOD)
    assert stored(templates) == [f"{sha}.tar.gz"]

    again = registry(tmp_path)  # the executor started again, same identity
    assert [t.name for t in again.list()] == ["repo", "same-content"]
    assert again.get("repo") == template
    again.remove("repo")
    assert stored(again) == [f"{sha}.tar.gz"]  # "same-content" still needs it
    again.remove("same-content")
    assert stored(again) == [] and again.archive_of(template.layer_id) is None
    with pytest.raises(UnknownTemplate, match="unknown template 'repo'"):
        registry(tmp_path).get("repo")


def test_a_name_given_new_content_drops_the_old(tmp_path: Path) -> None:
    templates = registry(tmp_path)
    add(templates, "repo", GOOD)
    newer = add(templates, "repo", tgz(file("only.txt", b"new")))
    assert stored(templates) == [f"{newer.sha256}.tar.gz"]


@pytest.mark.parametrize("shape", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_and_nothing_kept(tmp_path: Path, shape: str) -> None:
    templates = registry(tmp_path)
    with pytest.raises(ArchiveRefused):
        add(templates, "bad", HOSTILE[shape])
    assert templates.list() == []
    assert templates.directory is not None
    assert sorted(p.name for p in templates.directory.iterdir()) == []


def test_the_layer_metadata_name_and_broken_archives_are_refused(tmp_path: Path) -> None:
    templates = registry(tmp_path)
    with pytest.raises(ArchiveRefused, match="reserved"):
        add(templates, "meta", tgz(file("./.atropos-layer.json", b"{}")))
    with pytest.raises(ArchiveRefused, match="not a readable tar"):
        add(templates, "junk", b"not gzip at all")
    with pytest.raises(ArchiveRefused, match="not a readable tar"):
        add(templates, "cut", GOOD[: len(GOOD) // 2])
    assert templates.list() == [] and stored(templates) == []


def test_caps_answer_too_large(tmp_path: Path) -> None:
    templates = registry(tmp_path, max_bytes=4096, max_entries=3)
    with pytest.raises(TooLarge, match="entries"):
        add(templates, "many", tgz(*(file(f"f{i}", b"x") for i in range(4))))
    with pytest.raises(TooLarge, match="cap"):
        add(templates, "big", b"x" * 5000)  # the body itself, before any header is read
    with pytest.raises(TooLarge, match="bytes"):  # small archive, large files: a gzip bomb
        add(templates, "bomb", tgz(file("zeros", bytes(100_000))))
    assert templates.list() == [] and stored(templates) == []


def test_without_an_identity_templates_live_and_die_with_the_run(tmp_path: Path) -> None:
    templates = registry(tmp_path, identity=None)
    add(templates, "repo", GOOD)
    directory = templates.directory
    assert directory is not None and directory.name.startswith("templates-run-")
    other = registry(tmp_path, identity=None)  # a live run's directory is left alone
    assert directory.exists() and other.directory != directory
    templates.close()
    other.close()
    assert not directory.exists() and list(tmp_path.glob("templates-run-*")) == []
