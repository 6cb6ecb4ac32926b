"""Checks on a JSON schema before it is converted, and its local `$ref`s.

`check_schema` walks the whole document iteratively (so a deeply nested one cannot overflow
the stack): it must nest at most `limits.max_nesting` objects/arrays, and every local `$ref`
("#", "#/$defs/x", ...) in a schema position must resolve, as llama.cpp's converter requires
(its resolve_refs pass). `rebase_refs` prepares a schema to be embedded inside a larger one
(e.g. a tool's parameters inside a tool-call schema): its refs, relative to itself, are
rewritten to point into the embedded copy.
"""
from __future__ import annotations

from typing import Any

from ggserve.engine.grammar.gbnf import GrammarError, GrammarLimitError
from ggserve.engine.grammar.limits import DEFAULT_LIMITS, GrammarLimits

# keywords whose values are JSON data, not schemas: a "$ref" key inside them is just data
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


class SchemaReferenceError(GrammarError):
    """A local $ref that does not resolve: the schema is invalid, not merely unsupported."""


def resolve_pointer(root: Any, ref: str) -> Any:
    """The value `ref` ("#/a/b/0", JSON pointer escapes ~0 ~1) points at inside `root`."""
    target = root
    for part in ref[1:].split("/"):
        if not part:
            continue
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(target, dict) and part in target:
            target = target[part]
        elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
            target = target[int(part)]
        else:
            raise SchemaReferenceError(f"$ref {ref!r} does not resolve: nothing named {part!r} there")
    return target


def _walk(schema: Any, limits: GrammarLimits):
    """Yields (node, is_data) for every object/array in `schema`, checking the nesting."""
    todo = [(schema, 1, False)]
    while todo:
        node, depth, data = todo.pop()
        if not isinstance(node, (dict, list)):
            continue
        if depth > limits.max_nesting:
            raise GrammarLimitError(f"JSON schema nested deeper than {limits.max_nesting} levels")
        yield node, data
        if isinstance(node, dict):
            todo.extend((value, depth + 1, data or key in DATA_KEYWORDS) for key, value in node.items())
        else:
            todo.extend((value, depth + 1, data) for value in node)


def _local_ref(node: Any, data: bool) -> str | None:
    if data or not isinstance(node, dict):
        return None
    ref = node.get("$ref")
    return ref if isinstance(ref, str) and ref.startswith("#") else None


def check_schema(schema: Any, limits: GrammarLimits | None = None) -> None:
    """GrammarLimitError if `schema` nests deeper than `limits.max_nesting`; SchemaReferenceError
    naming the first local $ref that does not resolve within `schema`."""
    limits = DEFAULT_LIMITS if limits is None else limits
    refs = [ref for node, data in _walk(schema, limits) if (ref := _local_ref(node, data)) is not None]
    for ref in dict.fromkeys(refs):
        resolve_pointer(schema, ref)


def rebase_refs(schema: Any, pointer: str, limits: GrammarLimits | None = None) -> Any:
    """A copy of `schema` to embed at JSON pointer `pointer` (e.g. "#/properties/arguments") in a
    larger schema, with its local $refs (relative to `schema`) rewritten to point there.

    Raises like check_schema (refs are checked against `schema` itself, so a dangling one is
    named as written). Nothing is shared with `schema`."""
    check_schema(schema, limits)
    prefix = pointer.rstrip("/")

    def copy(node: Any, data: bool) -> Any:  # recursion depth bounded by check_schema
        if isinstance(node, list):
            return [copy(value, data) for value in node]
        if not isinstance(node, dict):
            return node
        out = {key: copy(value, data or key in DATA_KEYWORDS) for key, value in node.items()}
        ref = _local_ref(node, data)
        if ref is not None:
            out["$ref"] = prefix + ref[1:]
        return out

    try:
        return copy(schema, False)
    except RecursionError:  # a safety net: nesting is bounded well below the recursion limit
        raise GrammarLimitError("JSON schema nested too deeply to copy") from None
