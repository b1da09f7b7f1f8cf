"""Untrusted archives into the workspace: every member checked before a byte is written, then
all of it in place, or none of it.

The server stages an upload's body as a file in the slot's /tmp and sends ``extract`` naming
it. The agent runs as the slot's uid inside its isolation, so what it writes is the slot's own
(and, on an overlay workspace, lands in the slot's own layer). Steps:

1. **Check** every member from the tar headers alone (``check_members``): no absolute name, no
   ``..``, no device, FIFO or other special file, no symlink whose target is absolute or leads
   out of the workspace (resolved through the archive's own links, as the kernel would), no
   hard link to anything but an earlier regular file of the archive, no name twice, nothing
   below a file or link of the archive; entry count and total size under their caps, total
   size under what the workspace disk bound leaves.
2. **Extract** into a hidden staging directory inside the workspace: modes kept without
   setuid, setgid and sticky, mtimes kept. The disk bound is checked in allocated blocks as
   files are written (the headers give bytes; many small files take more).
3. **Move** the staged entries into place with renames, merging into existing directories,
   after checking that no rename can fail on what is there (a directory where the archive
   has a file, a directory the slot cannot write). Directory modes and mtimes go on last.

Any failure before the moves removes the staging directory: nothing partial is left. The
checks are this module's own, not tarfile's extraction filters (Python 3.12, 3.11.4): the
sandbox's python3 may be older.

``format: "file"``: the body is one file, written at ``path`` through the same staging.
"""

from __future__ import annotations

import os
import stat

from .results import ToolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile
    from collections.abc import Iterable
    from typing import IO, Any, BinaryIO

    from .workspace import Workspace

# Names the server gives the staged body (in the slot's /tmp) and the staging directory (in
# the workspace): the agent takes no other.
UPLOAD_PREFIX = ".atropos-upload-"
STAGING_PREFIX = ".atropos-extract-"
FORMATS = ("tar.gz", "file")
# Links followed when resolving a symlink's target, as the kernel's own bound (ELOOP).
MAX_LINK_HOPS = 40
COPY_CHUNK = 1 << 20
MIB = 1024 * 1024
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


class Refused(ToolError):
    """An archive this agent will not extract; ``limit`` names the cap it is over ("size",
    "entries"), None for an archive refused for what it holds."""

    def __init__(self, message: str, limit: str | None = None) -> None:
        super().__init__(message)
        self.limit = limit


# ---------------------------------------------------------------- checking members


def member_path(name: str) -> str:
    """A member's name as a path relative to the archive's root (``.`` for the root itself);
    refuses absolute names and ``..``."""
    if not name:
        raise Refused("a member has an empty name")
    if "\x00" in name:
        raise Refused(f"member {name!r}: a name with a NUL byte")
    if name.startswith("/"):
        raise Refused(f"member {name!r}: absolute path")
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise Refused(f"member {name!r}: '..' in its path")
    return "/".join(parts) or "."


def parent_parts(path: str) -> list[str]:
    return [] if path == "." else path.split("/")[:-1]


def resolve_links(parts: list[str], links: dict[str, str]) -> list[str] | None:
    """Where ``parts`` (a path from the workspace root) leads once the archive's symlinks
    (path from the workspace root -> target) are followed as the kernel follows them, ``..``
    after a link going up from where the link leads; None when it leaves the workspace, is
    absolute, or loops."""
    resolved: list[str] = []
    pending = list(reversed(parts))
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not resolved:
                return None
            resolved.pop()
            continue
        resolved.append(part)
        target = links.get("/".join(resolved))
        if target is None:
            continue
        hops += 1
        if hops > MAX_LINK_HOPS or target.startswith("/"):
            return None
        resolved.pop()
        pending.extend(reversed(target.split("/")))
    return resolved


class Plan:
    """What an archive holds once checked: its members in order, with their paths."""

    def __init__(self) -> None:
        self.members: list[tuple[str, tarfile.TarInfo]] = []
        self.total_bytes = 0


def check_members(
    members: Iterable[tarfile.TarInfo], base: str, max_entries: int, max_bytes: int
) -> Plan:
    """Check every member of an archive to be extracted at ``base`` (its path from the
    workspace root, ``.`` for the root); raises ``Refused`` naming the member and the reason.

    ``members`` is read lazily: the entry cap stops the read of a huge archive early.
    """
    plan = Plan()
    kinds: dict[str, str] = {}  # path -> "dir" | "file" | "link", as the archive made it
    implied_dirs: set[str] = set()  # parents of members
    links: dict[str, str] = {}
    base_parts = [] if base == "." else base.split("/")
    for member in members:
        if len(plan.members) >= max_entries:
            raise Refused(f"the archive has more than {max_entries} entries", limit="entries")
        path = member_path(member.name)
        label = f"member {member.name!r}"
        if member.isdir():
            kind = "dir"
        elif member.isreg():
            kind = "file"
        elif member.issym():
            kind = "link"
        elif member.islnk():
            kind = "hardlink"
        elif member.ischr() or member.isblk():
            raise Refused(f"{label}: a device file")
        elif member.isfifo():
            raise Refused(f"{label}: a FIFO")
        else:
            raise Refused(f"{label}: an unsupported entry type {member.type!r}")
        if path == "." and kind != "dir":
            raise Refused(f"{label}: the archive's root must be a directory")
        parts = [] if path == "." else path.split("/")
        for depth in range(1, len(parts)):
            above = "/".join(parts[:depth])
            if kinds.get(above, "dir") != "dir":
                raise Refused(f"{label}: below {above!r}, which the archive made a {kinds[above]}")
            implied_dirs.add(above)
        earlier = kinds.get(path)
        if earlier is not None and not (earlier == "dir" and kind == "dir"):
            raise Refused(f"{label}: the name appears twice in the archive")
        if kind != "dir" and path in implied_dirs:
            raise Refused(f"{label}: the archive has entries below it, so it must be a directory")
        if kind == "hardlink":
            target = member.linkname
            try:
                target_path = member_path(target)
            except Refused:
                raise Refused(f"{label}: a hard link out of the archive ({target!r})") from None
            if kinds.get(target_path) != "file":
                raise Refused(
                    f"{label}: a hard link to {target!r}, which is not an earlier file of "
                    "the archive"
                )
            kind = "file"  # another name for that file: what is below it is refused alike
        elif kind == "link":
            target = member.linkname
            if not target or "\x00" in target:
                raise Refused(f"{label}: a symlink without a valid target")
            if target.startswith("/"):
                raise Refused(f"{label}: a symlink to the absolute path {target!r}")
            links["/".join([*base_parts, *parts])] = target
        elif kind == "file":
            plan.total_bytes += member.size
            if plan.total_bytes > max_bytes:
                raise Refused(
                    f"the archive's files hold more than {max_bytes} bytes (at {member.name!r})",
                    limit="size",
                )
        kinds[path] = kind
        plan.members.append((path, member))
    # Checked once every link is known: a link's target may go through a later one.
    for path, member in plan.members:
        if member.issym():
            where = [*base_parts, *parent_parts(path), *member.linkname.split("/")]
            if resolve_links(where, links) is None:
                raise Refused(
                    f"member {member.name!r}: a symlink to {member.linkname!r}, which leads "
                    "out of the workspace (or round in a loop)"
                )
    return plan


# ---------------------------------------------------------------- the operation


def extract(workspace: Workspace, request: dict[str, Any]) -> dict[str, Any]:
    """The ``extract`` operation: ``{archive, staging, path, format, max_bytes, max_entries}``
    -> ``{success, error, bytes, entry_count, limit}``."""
    archive = request.get("archive")
    staging = request.get("staging")
    if not (isinstance(archive, str) and is_own_name(archive, UPLOAD_PREFIX)):
        raise ToolError("'archive' must name a staged upload")
    if not (isinstance(staging, str) and is_own_name(staging, STAGING_PREFIX)):
        raise ToolError("'staging' must name a staging directory")
    handle = open_staged(os.path.join(workspace.scratch[0], archive))
    size = os.fstat(handle.fileno()).st_size
    answer: dict[str, Any] = {
        "success": False,
        "output": "",
        "error": "",
        "bytes": size,
        "entry_count": 0,
        "limit": None,
    }
    try:
        job = Extraction(workspace, os.path.join(workspace.root, staging), request)
        if request.get("format", "tar.gz") == "file":
            job.one_file(handle, size)
        else:
            job.archive(handle)
        answer["success"] = True
        answer["entry_count"] = job.entry_count
        answer["output"] = f"extracted {job.entry_count} entries into {job.target_name}"
    except Refused as exc:
        answer["error"] = str(exc)
        answer["limit"] = exc.limit
    except ToolError as exc:
        answer["error"] = str(exc)
    finally:
        handle.close()
    return answer


def is_own_name(name: str, prefix: str) -> bool:
    return name.startswith(prefix) and "/" not in name and len(name) > len(prefix)


def open_staged(path: str) -> BinaryIO:
    """The staged body, opened then unlinked at once: it never counts against the slot's
    disk bound while it is extracted, and it is gone whatever happens next."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ToolError(f"the staged upload is missing: {exc.strerror}") from None
    try:
        os.unlink(path)
    except OSError:
        pass  # the server removes it after the call in any case
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ToolError("the staged upload is not a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


class Extraction:
    """One upload into the workspace: its target, its staging directory, the blocks it took."""

    def __init__(self, workspace: Workspace, staging: str, request: dict[str, Any]) -> None:
        fmt = request.get("format", "tar.gz")
        if fmt not in FORMATS:
            raise ToolError(f"'format' must be one of {', '.join(FORMATS)}")
        self.workspace = workspace
        self.staging = staging
        self.max_bytes = positive(request.get("max_bytes"), "max_bytes")
        self.max_entries = positive(request.get("max_entries"), "max_entries")
        self.target = workspace.resolve(request.get("path", "."))
        self.target_name = workspace.display(self.target)
        self.entry_count = 0
        self.used_before = 0
        self.allocated = 0
        # Parent directories of the target made by this upload, removed again on failure.
        self.made_parents: list[str] = []

    # ---- the two formats

    def archive(self, handle: BinaryIO) -> None:
        import tarfile

        if os.path.lexists(self.target) and not is_real_dir(self.target):
            raise Refused(f"{self.target_name} exists and is not a directory")
        base = os.path.relpath(self.target, self.workspace.root)
        try:
            tar = tarfile.open(fileobj=handle, mode="r:gz")  # noqa: SIM115 - closed just below
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise Refused(f"not a tar.gz archive: {exc}") from None
        with tar:
            try:
                plan = check_members(tar, base, self.max_entries, self.max_bytes)
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                raise Refused(f"the archive is damaged: {exc}") from None
            except MemoryError:
                raise Refused("the archive's headers need more memory than the slot has") from None
            self.entry_count = len(plan.members)
            self.check_disk(plan.total_bytes, 0)
            self.stage(lambda: self.write_members(tar, plan))
            self.move_into_place(plan)

    def one_file(self, handle: BinaryIO, size: int) -> None:
        if size > self.max_bytes:
            raise Refused(f"the file has more than {self.max_bytes} bytes", limit="size")
        if self.target == self.workspace.root or is_real_dir(self.target):
            raise Refused(f"{self.target_name} is a directory")
        existing = os.lstat(self.target) if os.path.lexists(self.target) else None
        self.check_disk(size, existing.st_size if existing else 0)
        # A file written over keeps its mode (a script stays executable).
        replaced = existing is not None and stat.S_ISREG(existing.st_mode)
        mode = stat.S_IMODE(existing.st_mode) if existing and replaced else 0o644
        staged = os.path.join(self.staging, "file")
        self.entry_count = 1

        def write() -> None:
            fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                write_from(handle, fd, size, self.target_name)
                os.fchmod(fd, mode & ~SPECIAL_BITS)
                self.count_blocks(os.fstat(fd).st_blocks, self.target_name)
            finally:
                os.close(fd)

        self.stage(write)
        try:
            self.make_parents(os.path.dirname(self.target))
            os.replace(staged, self.target)
        except OSError as exc:
            self.undo()
            raise ToolError(f"cannot write {self.target_name}: {exc.strerror}") from None
        remove_tree(self.staging)

    # ---- staging

    def stage(self, write: Any) -> None:
        """Run ``write`` into a new staging directory; on any failure remove it (and what this
        upload made) and say why."""
        try:
            os.mkdir(self.staging, 0o700)
        except OSError as exc:
            raise ToolError(f"cannot make a staging directory: {exc.strerror}") from None
        try:
            write()
        except BaseException as exc:
            self.undo()
            if isinstance(exc, ToolError):
                raise
            if isinstance(exc, MemoryError):
                raise Refused("the archive needs more memory than the slot has") from None
            raise

    def undo(self) -> None:
        remove_tree(self.staging)
        for made in reversed(self.made_parents):
            try:
                os.rmdir(made)
            except OSError:
                break

    def check_disk(self, adding: int, replacing: int) -> None:
        """Refuse what cannot fit the slot's disk bound, before writing any of it."""
        self.used_before = self.workspace.disk_usage()
        limit = self.workspace.disk_limit
        if self.used_before - replacing + adding > limit:
            raise ToolError(
                f"extracting {adding} bytes would exceed the workspace disk limit of "
                f"{limit // MIB} MiB ({self.used_before} bytes in use); delete files to continue"
            )

    def count_blocks(self, blocks: int, name: str) -> None:
        """What a written entry took, in allocated blocks, against the disk bound."""
        self.allocated += blocks * 512
        limit = self.workspace.disk_limit
        if self.used_before + self.allocated > limit:
            raise ToolError(
                f"extracting {name} took the workspace over its disk limit of {limit // MIB} "
                f"MiB (files take whole blocks on disk); nothing was extracted"
            )

    def write_members(self, tar: tarfile.TarFile, plan: Plan) -> None:
        import tarfile

        made_dirs = {"."}
        for path, member in plan.members:
            if path == ".":
                continue
            staged = os.path.join(self.staging, path)
            parent = os.path.dirname(path) or "."
            try:
                if parent not in made_dirs:
                    os.makedirs(os.path.join(self.staging, parent), 0o755, exist_ok=True)
                    made_dirs.add(parent)
                if member.isdir():
                    if path not in made_dirs:
                        os.makedirs(staged, 0o755, exist_ok=True)
                        made_dirs.add(path)
                    self.count_blocks(os.lstat(staged).st_blocks, member.name)
                elif member.issym():
                    os.symlink(member.linkname, staged)
                    set_mtime(staged, member.mtime, follow=False)
                elif member.islnk():
                    source = os.path.join(self.staging, member_path(member.linkname))
                    os.link(source, staged, follow_symlinks=False)
                else:
                    self.write_file(tar, member, staged)
            except OSError as exc:
                raise ToolError(
                    f"cannot extract member {member.name!r}: {exc.strerror}; nothing was extracted"
                ) from None
            except (tarfile.TarError, EOFError, ValueError) as exc:
                raise Refused(
                    f"the archive is damaged at member {member.name!r}: {exc}; nothing was "
                    "extracted"
                ) from None

    def write_file(self, tar: tarfile.TarFile, member: tarfile.TarInfo, staged: str) -> None:
        source = tar.extractfile(member)
        assert source is not None  # a regular member has data
        fd = os.open(staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            write_from(source, fd, member.size, member.name)
            os.fchmod(fd, member.mode & 0o777)
            set_mtime(fd, member.mtime)
            self.count_blocks(os.fstat(fd).st_blocks, member.name)
        finally:
            os.close(fd)

    # ---- into place

    def move_into_place(self, plan: Plan) -> None:
        created = not os.path.lexists(self.target)
        try:
            if created:
                self.make_parents(os.path.dirname(self.target))
                os.rename(self.staging, self.target)
            else:
                self.check_merge(self.staging, self.target)
                merge(self.staging, self.target)
        except OSError as exc:
            self.undo()
            raise ToolError(
                f"cannot move the extracted files into {self.target_name}: {exc.strerror}"
            ) from None
        remove_tree(self.staging)
        # Last, deepest first: the moves changed directories' mtimes, and a directory whose
        # mode takes away its owner's search or write right is done with by then. The
        # archive's root applies to the target only when this upload made it.
        dirs = [
            (os.path.normpath(os.path.join(self.target, path)), member)
            for path, member in plan.members
            if member.isdir() and (path != "." or created)
        ]
        if created and not any(path == "." for path, _ in plan.members):
            os.chmod(self.target, 0o755)
        for final, member in sorted(dirs, key=lambda item: item[0].count("/"), reverse=True):
            if is_real_dir(final):
                try:
                    os.chmod(final, member.mode & 0o777)
                except OSError:
                    pass  # a directory of the slot's own that it cannot change: left as it is
                set_mtime(final, member.mtime)

    def check_merge(self, staged_dir: str, existing_dir: str) -> None:
        """Refuse, before the first rename, what would stop one midway."""
        if not os.access(existing_dir, os.W_OK | os.X_OK):
            name = self.workspace.display(existing_dir)
            raise Refused(f"{name} is not writable by the slot")
        with os.scandir(staged_dir) as entries:
            for entry in entries:
                there = os.path.join(existing_dir, entry.name)
                if not is_real_dir(there):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    self.check_merge(entry.path, there)
                else:
                    name = self.workspace.display(there)
                    raise Refused(
                        f"{name} is a directory in the workspace and a file in the archive"
                    )

    def make_parents(self, directory: str) -> None:
        missing = []
        while not os.path.lexists(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        if not is_real_dir(directory):
            raise ToolError(f"{self.workspace.display(directory)} is not a directory")
        for path in reversed(missing):
            os.mkdir(path, 0o755)
            self.made_parents.append(path)


def merge(staged_dir: str, existing_dir: str) -> None:
    """Move every entry of ``staged_dir`` into ``existing_dir``: into a directory there,
    entry by entry; over anything else there (a file, a symlink, never followed)."""
    with os.scandir(staged_dir) as entries:
        names = [(entry.name, entry.is_dir(follow_symlinks=False)) for entry in entries]
    for name, is_dir in names:
        source = os.path.join(staged_dir, name)
        there = os.path.join(existing_dir, name)
        if is_real_dir(there):
            merge(source, there)  # checked before: ``source`` is a directory too
            continue
        if is_dir and os.path.lexists(there):
            os.unlink(there)
        os.replace(source, there)


# ---------------------------------------------------------------- small helpers


def positive(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ToolError(f"'{name}' must be a positive integer")
    return value


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def write_from(source: IO[bytes], fd: int, size: int, name: str) -> None:
    """``size`` bytes of ``source`` into ``fd``; refused when ``source`` ends first."""
    left = size
    while left > 0:
        chunk = source.read(min(COPY_CHUNK, left))
        if not chunk:
            raise Refused(f"member {name!r} ends before its {size} bytes")
        view = memoryview(chunk)
        while view:
            view = view[os.write(fd, view) :]
        left -= len(chunk)


def set_mtime(target: Any, mtime: Any, follow: bool = True) -> None:
    """Keep an entry's mtime; one the filesystem cannot hold is left as now."""
    try:
        os.utime(target, (mtime, mtime), follow_symlinks=follow)
    except (OSError, OverflowError, ValueError, TypeError):
        pass


def remove_tree(path: str) -> None:
    """Remove a staging directory, whatever modes it holds (it is the agent's own)."""
    import shutil

    def writable_and_retry(func: Any, target: str, _exc: Any) -> None:
        try:
            os.chmod(os.path.dirname(target), 0o700)
            func(target)
        except OSError:
            pass

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=writable_and_retry)
