"""Reading the config file: YAML, `${ENV}` interpolation, `include:`, and dumping it back.

Steps, each of which reports every problem it finds as a "path: message" line:

1. YAML is read with a strict loader: duplicate keys are errors, and only true/false are
   booleans (YAML 1.1 would read the retry condition key `on:` as True).
2. `${NAME}` / `${NAME:-default}` are replaced inside string values of the parsed tree, never
   in the raw text, so a variable's value cannot inject YAML. Before parsing, each reference is
   swapped for a same-length placeholder so that the documented flow style
   `api_keys: [${ALICE_API_KEY}]` parses (YAML forbids `{` in a flow-context plain scalar).
3. `include:` files add their services, consumers, routes and plugins; names must not repeat.
4. The merged tree is validated by `GatewayConfig`; errors in an included file name that file.
"""

from __future__ import annotations

import os
import re
import weakref
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from apigate.config.errors import ConfigError, Loc, error_message, format_loc
from apigate.config.schema import GatewayConfig

__all__ = [
    "ConfigSources",
    "config_location",
    "dump_config",
    "interpolate_env",
    "load_config",
    "parse_config",
]

MERGED_SECTIONS = ("services", "consumers", "routes", "plugins")
# Deeper than any config needs (a transform's JSON value inside a route's plugin: ~10 levels),
# shallow enough that validating, dumping and storing it never hits a recursion limit: a config
# nested too deeply for pydantic to serialize once made every later admin call answer 500.
MAX_DEPTH = 64
KEYED_SECTIONS = ("services", "plugins")


# --- YAML -----------------------------------------------------------------------------------


class _RejectDuplicateKeys:
    """Mixin for a PyYAML loader: a key repeated in one mapping is an error."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while reading a mapping",
                        node.start_mark,
                        f"found duplicate key {key_node.value!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep)  # type: ignore[misc, no-any-return]


class _StrictLoader(_RejectDuplicateKeys, yaml.SafeLoader):
    """SafeLoader with YAML 1.2 booleans, no timestamps, and duplicate keys rejected."""


_StrictLoader.yaml_implicit_resolvers = {
    first: [
        (tag, regexp)
        for tag, regexp in resolvers
        if tag not in ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:timestamp")
    ]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_StrictLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


# libyaml's C parser, when PyYAML has it, with the same constructor and resolver: ~6x faster on a
# 10,000-route file (8 s -> 1.4 s measured). Its error messages are vaguer, so a file it refuses
# is parsed again by the pure-Python loader just to describe the error.
_CLoader = getattr(yaml, "CSafeLoader", None)
_FastLoader: Any = _StrictLoader
if _CLoader is not None:
    _FastLoader = type("_FastStrictLoader", (_RejectDuplicateKeys, _CLoader), {})
    _FastLoader.yaml_implicit_resolvers = _StrictLoader.yaml_implicit_resolvers


# Placeholders are private-use characters: a marker, one character for the reference's index,
# and padding up to the reference's length, so YAML error columns stay right.
_REFERENCE_TEXT = re.compile(r"\$?\$\{[^}\n]*\}")
_PLACEHOLDER = re.compile("\ue000([\ue100-\uefff])\ue001*")
_PRIVATE_USE = re.compile("[\ue000-\uefff]")
_MAX_PLACEHOLDERS = 0xEFFF - 0xE100 + 1


def _protect_references(text: str) -> tuple[str, list[str]]:
    references: list[str] = []
    if _PRIVATE_USE.search(text) or len(_REFERENCE_TEXT.findall(text)) > _MAX_PLACEHOLDERS:
        return text, references  # leave it to plain YAML rather than risk a clash

    def swap(match: re.Match[str]) -> str:
        references.append(match[0])
        marker = "\ue000" + chr(0xE100 + len(references) - 1)
        return marker + "\ue001" * (len(match[0]) - len(marker))

    return _REFERENCE_TEXT.sub(swap, text), references


def _restore_references(node: Any, references: list[str]) -> Any:
    if not references:
        return node
    if isinstance(node, str):
        return _PLACEHOLDER.sub(lambda m: references[ord(m[1]) - 0xE100], node)
    if isinstance(node, dict):
        return {
            _restore_references(key, references): _restore_references(value, references)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_restore_references(item, references) for item in node]
    return node


def _read_yaml(path: Path, shown_as: str = "") -> Any:
    """The parsed document in `path`; error lines start with `shown_as` when given."""
    prefix = f"{shown_as}: " if shown_as else ""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{prefix}file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{prefix}cannot read: {exc}") from None
    protected, references = _protect_references(text)
    try:
        try:
            data = yaml.load(protected, Loader=_FastLoader)
        except yaml.YAMLError:
            data = yaml.load(protected, Loader=_StrictLoader)  # raises, with a precise message
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{prefix}{_describe_yaml_error(exc)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{prefix}invalid YAML: {exc}") from None
    except RecursionError:
        # The pure-Python parser recurses per level; libyaml (PyYAML 6.0.4 on) stops at 1,000
        # levels itself and hands the file to that parser to describe. Either way the file is
        # deeper than MAX_DEPTH, which is what the user needs to hear.
        message = f"nested more than {MAX_DEPTH} levels deep"
        raise ConfigError(f"{prefix}invalid YAML: {message}") from None
    too_deep = _too_deep(data)
    if too_deep is not None:  # before anything walks it recursively (interpolation)
        raise ConfigError(f"{prefix}{_too_deep_message(too_deep)}")
    return _restore_references(data, references)


def _describe_yaml_error(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
    problem = exc.problem or "invalid YAML"
    context = f" ({exc.context})" if exc.context else ""
    return f"{where}{problem}{context}"


# --- environment variables ------------------------------------------------------------------

_REFERENCE = re.compile(
    r"\$\$\{"  # an escaped "${"
    r"|\$\{(?:(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\})?"
)


def interpolate_env(data: Any, env: Mapping[str, str] | None = None) -> Any:
    """`data` with `${NAME}` / `${NAME:-default}` replaced in every string value.

    `${NAME:-default}` uses the default when NAME is unset or empty (as in the shell);
    `$${` gives a literal `${`. Keys are left alone. Raises ConfigError naming every
    variable that is missing, with the path where it is used.
    """
    problems: list[str] = []
    result = _interpolate(data, os.environ if env is None else env, (), problems)
    if problems:
        raise ConfigError(problems)
    return result


def _interpolate(node: Any, env: Mapping[str, str], loc: Loc, problems: list[str]) -> Any:
    if isinstance(node, str):
        return _interpolate_string(node, env, loc, problems) if "$" in node else node
    if isinstance(node, dict):
        return {
            key: _interpolate(value, env, (*loc, str(key)), problems) for key, value in node.items()
        }
    if isinstance(node, list):
        return [_interpolate(item, env, (*loc, index), problems) for index, item in enumerate(node)]
    return node


def _interpolate_string(text: str, env: Mapping[str, str], loc: Loc, problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name, default = match["name"], match["default"]
        if name is None:
            problems.append(f"{format_loc(loc)}: bad variable reference: use ${{NAME}}")
            return ""
        value = env.get(name)
        if default is not None and not value:
            return default
        if value is None:
            hint = f"set it, or write ${{{name}:-default}}"
            problems.append(f"{format_loc(loc)}: environment variable {name} is not set ({hint})")
            return ""
        return value

    return _REFERENCE.sub(replace, text)


# --- includes -------------------------------------------------------------------------------


@dataclass
class ConfigSources:
    """What a config was read from: every file (the main one first) and every `include:`
    glob, which a file created later may match. `apigate run --watch` stats them all."""

    files: list[Path] = field(default_factory=list)
    globs: list[tuple[Path, str]] = field(default_factory=list)  # (folder, pattern)

    def stamp(self) -> tuple[tuple[str, float, int], ...]:
        """(path, mtime, size) of every file and glob match now: changes when one is edited,
        created or removed (a missing file counts as (path, 0, -1))."""
        paths = dict.fromkeys(self.files)
        for folder, pattern in self.globs:
            paths.update(dict.fromkeys(p.resolve() for p in sorted(folder.glob(pattern))))
        out = []
        for path in paths:
            try:
                st = path.stat()
            except OSError:
                out.append((str(path), 0.0, -1))
            else:
                out.append((str(path), st.st_mtime, st.st_size))
        return tuple(out)


@dataclass
class _Origins:
    """Where each merged item came from, to name the file in its errors.

    Routes and consumers are renumbered: `routes[4]` of the merged file may be `routes[0]`
    of `routes.yaml`. Keys are (section, merged index or name) -> (file, index or name).
    """

    items: dict[tuple[str, str | int], tuple[str, str | int]] = field(default_factory=dict)
    sources: ConfigSources = field(default_factory=ConfigSources)

    @property
    def files(self) -> list[Path]:
        return self.sources.files

    def locate(self, loc: Loc) -> tuple[str | None, Loc]:
        if len(loc) >= 2 and (str(loc[0]), loc[1]) in self.items:
            shown_as, local = self.items[(str(loc[0]), loc[1])]
            return shown_as, (loc[0], local, *loc[2:])
        return None, loc


def _include_paths(
    tree: dict[str, Any], base: Path, shown_as: str, globs: list[tuple[Path, str]]
) -> Iterator[Path]:
    entries = tree.pop("include", None)
    if entries is None:
        return
    if isinstance(entries, str):
        entries = [entries]
    if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
        prefix = f"{shown_as}: " if shown_as else ""
        raise ConfigError(f"{prefix}include: must be a list of file paths")
    for entry in entries:
        if any(char in entry for char in "*?["):
            globs.append((base, entry))
            yield from sorted(base.glob(entry))  # "conf.d/*.yaml"; no match is fine
        else:
            yield base / entry


def _merge_includes(
    root: dict[str, Any], path: Path, env: Mapping[str, str], origins: _Origins
) -> None:
    """Merge into `root` (read from `path`) every file it includes, and theirs, in order.

    Included paths are relative to the file that names them; errors name files relative to
    the main file's folder.
    """
    main = path.resolve()
    pending: list[tuple[dict[str, Any], Path, str, tuple[Path, ...]]] = [(root, path, "", (main,))]
    problems: list[str] = []
    globs = origins.sources.globs
    while pending:
        tree, tree_path, tree_shown, chain = pending.pop(0)
        for included in _include_paths(tree, tree_path.parent, tree_shown, globs):
            resolved = included.resolve()
            shown_as = os.path.relpath(included, path.parent)
            if resolved in chain:
                cycle = " -> ".join(p.name for p in (*chain, resolved))
                raise ConfigError(f"{shown_as}: include cycle: {cycle}")
            if resolved in origins.files:
                raise ConfigError(f"{shown_as}: included more than once")
            origins.files.append(resolved)
            data = _read_included(included, shown_as, env)
            problems += _merge_one(root, data, shown_as, origins)
            pending.append((data, included, shown_as, (*chain, resolved)))
    if problems:
        raise ConfigError(problems)


def _read_included(path: Path, shown_as: str, env: Mapping[str, str]) -> dict[str, Any]:
    data = _read_yaml(path, shown_as)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{shown_as}: must be a mapping with services, consumers, routes...")
    extra = sorted(set(map(str, data)) - {*MERGED_SECTIONS, "include"})
    if extra:
        allowed = ", ".join((*MERGED_SECTIONS, "include"))
        raise ConfigError(
            [
                f"{shown_as}: {key}: not allowed in an included file (only {allowed})"
                for key in extra
            ]
        )
    try:
        return dict(interpolate_env(data, env))
    except ConfigError as exc:
        raise ConfigError([f"{shown_as}: {line}" for line in exc.errors]) from None


def _merge_one(
    root: dict[str, Any], data: dict[str, Any], shown_as: str, origins: _Origins
) -> list[str]:
    problems: list[str] = []
    for section in MERGED_SECTIONS:
        items = data.get(section)
        if items is None:
            continue
        if root.get(section) is None:
            root[section] = {} if section in KEYED_SECTIONS else []
        target = root[section]
        if isinstance(items, dict) and isinstance(target, dict):
            problems += _merge_keyed(target, items, section, shown_as, origins)
        elif isinstance(items, list) and isinstance(target, list):
            problems += _merge_named(target, items, section, shown_as, origins)
        else:
            kind = "a mapping" if section in KEYED_SECTIONS else "a list"
            problems.append(f"{shown_as}: {section}: must be {kind}")
    return problems


def _merge_keyed(
    target: dict[str, Any], items: dict[str, Any], section: str, shown_as: str, origins: _Origins
) -> list[str]:
    problems = []
    for name, value in items.items():
        if name in target:
            where = origins.items.get((section, name), ("the main file", name))[0]
            problems.append(f"{shown_as}: {section}.{name}: already defined in {where}")
            continue
        target[name] = value
        origins.items[(section, name)] = (shown_as, name)
    return problems


def _merge_named(
    target: list[Any], items: list[Any], section: str, shown_as: str, origins: _Origins
) -> list[str]:
    problems = []
    names = {_item_name(item): index for index, item in enumerate(target)}
    what = section.removesuffix("s")
    for local, item in enumerate(items):
        name = _item_name(item)
        if name is not None and name in names:
            where = origins.items.get((section, names[name]), ("the main file", 0))[0]
            problems.append(
                f"{shown_as}: {section}[{local}]: {what} {name!r} already defined in {where}"
            )
            continue
        origins.items[(section, len(target))] = (shown_as, local)
        if name is not None:
            names[name] = len(target)
        target.append(item)
    return problems


def _item_name(item: Any) -> str | None:
    name = item.get("name") if isinstance(item, dict) else None
    return name if isinstance(name, str) else None


# --- public entry points --------------------------------------------------------------------


# Where the items of each config loaded from files came from (by id: models are not
# hashable; the entry goes with the config), so that problems found only when the config is
# compiled (plugin configs, the matcher) name the included file as schema errors do.
_LOADED_ORIGINS: dict[int, _Origins] = {}


# Configs parsed `by_name` (see parse_config), by id, so that problems found when they are
# compiled (plugin configs, the matcher) name their routes as the schema's errors did.
_NAMED_CONFIGS: dict[int, None] = {}


def config_location(config: GatewayConfig, section: str, key: str | int) -> str:
    """`routes[4]`, `plugins.cors` as the files say: `conf.d/api.yaml: routes[0]` for the
    first route of an included file (`config` loaded by `load_config`); `routes[4] (extra)`
    for a config parsed `by_name`."""
    if id(config) in _NAMED_CONFIGS and isinstance(key, int):
        items = config.routes if section == "routes" else config.consumers
        if section in ("routes", "consumers") and key < len(items):
            return f"{section}[{key}] ({items[key].name})"
    origins = _LOADED_ORIGINS.get(id(config))
    shown_as, loc = origins.locate((section, key)) if origins else (None, (section, key))
    where = format_loc(loc)
    return f"{shown_as}: {where}" if shown_as else where


def load_config(
    path: str | Path,
    *,
    env: Mapping[str, str] | None = None,
    sources: ConfigSources | None = None,
) -> GatewayConfig:
    """Read, interpolate, merge and validate a config file; raises ConfigError.

    `sources`, when given, is filled with the files read and the include globs as they are
    met, so that it says what to watch even when the config turns out invalid."""
    path = Path(path)
    source = str(path)
    environment = os.environ if env is None else env
    origins = _Origins(sources=sources if sources is not None else ConfigSources())
    origins.files.append(path.resolve())
    try:
        data = _read_yaml(path)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(_not_a_mapping(data), source)
    try:
        data = interpolate_env(data, environment)
        _merge_includes(data, path, environment, origins)
    except ConfigError as exc:
        raise ConfigError(exc.errors, source) from None
    config = _validate(data, source, origins)
    if origins.items:
        key = id(config)
        _LOADED_ORIGINS[key] = origins
        weakref.finalize(config, _LOADED_ORIGINS.pop, key, None)
    return config


def parse_config(data: Any, source: str = "<config>", *, by_name: bool = False) -> GatewayConfig:
    """Validate an already-parsed config (say, JSON from the admin API); raises ConfigError.

    No `${ENV}` interpolation and no `include:` here: those belong to files on disk.
    `by_name`: errors name routes and consumers by their names too (`routes[16] (extra)`),
    for a document its sender knows by names only (one entity changed, stored changes).
    """
    if not isinstance(data, dict):
        raise ConfigError(_not_a_mapping(data), source)
    too_deep = _too_deep(data)  # (a file's tree was measured as it was read: _read_yaml)
    if too_deep is not None:
        raise ConfigError(_too_deep_message(too_deep), source)
    config = _validate(data, source, _Origins(), by_name=by_name)
    if by_name:
        key = id(config)
        _NAMED_CONFIGS[key] = None
        weakref.finalize(config, _NAMED_CONFIGS.pop, key, None)
    return config


def dump_config(config: GatewayConfig) -> dict[str, Any]:
    """The effective config as JSON-able data, with durations as "5s" and sizes as "32KiB".

    `parse_config(dump_config(config)) == config`.
    """
    return config.model_dump(mode="json")


def _validate(
    data: dict[str, Any], source: str, origins: _Origins, *, by_name: bool = False
) -> GatewayConfig:
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        lines = []
        for error in exc.errors():
            shown_as, loc = origins.locate(error["loc"])
            where = _named_item(loc, data) if by_name else format_loc(loc)
            line = f"{where}: {error_message(error)}" if loc else error_message(error)
            lines.append(f"{shown_as}: {line}" if shown_as else line)
        raise ConfigError(lines, source) from None


def _named_item(loc: Loc, data: dict[str, Any]) -> str:
    """`routes[16] (extra).service`: a route or consumer by its name too (see parse_config's
    `by_name`). Its position in a merged list means nothing to whoever sent one route."""
    where = format_loc(loc)
    if len(loc) < 2 or loc[0] not in ("routes", "consumers") or not isinstance(loc[1], int):
        return where
    items = data.get(str(loc[0]))
    item = items[loc[1]] if isinstance(items, list) and loc[1] < len(items) else None
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or not name:
        return where
    head = format_loc(loc[:2])
    return f"{head} ({name}){where[len(head) :]}"


def _too_deep(data: Any) -> tuple[str | int, ...] | None:
    """The path of a value nested more than MAX_DEPTH levels deep, if any (no recursion)."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(data, ())]
    while stack:
        node, loc = stack.pop()
        if len(loc) > MAX_DEPTH:
            return loc
        if isinstance(node, dict):
            stack.extend((value, (*loc, str(key))) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*loc, index)) for index, value in enumerate(node))
    return None


def _too_deep_message(loc: Loc) -> str:
    return f"{format_loc(loc[:8])}...: nested more than {MAX_DEPTH} levels deep"


def _not_a_mapping(data: Any) -> str:
    return f"the configuration must be a mapping of keys (got {type(data).__name__})"
