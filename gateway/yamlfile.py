"""YAML as the gateway reads its files (configuration, profiles, rules, mappings, TTP callers): safe, and a
key given twice in one mapping is an error. PyYAML keeps the last silently, so a reviewer of a profile saw
`note: drop` while the second `note: keep` was what applied (a probe)."""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKey(yaml.constructor.ConstructorError):
    """A key given twice in one mapping."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor`: merged keys may be overridden, as YAML says (a re-probe's config)
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise DuplicateKey(
                        "while reading a mapping",
                        node.start_mark,
                        f"the key {key!r} is given twice",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load(stream: Any) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (a ``yaml.YAMLError``)."""
    return yaml.load(stream, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def problem(exc: yaml.YAMLError) -> str:
    """"not valid YAML (line L, column C)", and what is wrong when it is a key given twice (other parser
    messages may quote the file's text)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    if isinstance(exc, DuplicateKey):
        return f"not valid YAML: {exc.problem}{where}"
    return f"not valid YAML{where}"
