"""JSON schema -> GBNF grammar, in the style of llama.cpp's json-schema-to-grammar.

Supported: type (object / array / string / number / integer / boolean / null, or a list of
types), enum, const, properties with required vs optional (optional ones may appear in
schema order, any subset), additionalProperties (false / true / schema; absent = false as in
llama.cpp), items / prefixItems with minItems / maxItems, anyOf / oneOf, $ref to #/$defs,
#/definitions or # (recursion allowed), string formats date, time, date-time and uuid,
minLength / maxLength. Whitespace between tokens follows llama.cpp's `space` rule.

integer minimum / maximum / exclusiveMinimum / exclusiveMaximum.

Anything else that would change which documents are valid (pattern, number bounds, allOf,
unknown formats...) raises GrammarError rather than being silently ignored; pure annotations
(title, description, default, examples, ...) are ignored.

Limits (`GrammarLimits`): the schema document may nest `max_nesting` levels (checked before
converting, iteratively; $ref chains count too), and the grammar made from it may not exceed
`max_grammar_bytes` (checked as it grows). A local $ref that does not resolve, anywhere in the
schema, is a `SchemaReferenceError` (see schema_refs.py).
"""
from __future__ import annotations

import json
import re
from typing import Any

from ggserve.engine.grammar.gbnf import GrammarError, GrammarLimitError
from ggserve.engine.grammar.limits import DEFAULT_LIMITS, GrammarLimits
from ggserve.engine.grammar.schema_refs import check_schema, resolve_pointer

SPACE_RULE = '| " " | "\\n"{1,2} [ \\t]{0,20}'

PRIMITIVES: dict[str, tuple[str, tuple[str, ...]]] = {
    "boolean": ('("true" | "false") space', ()),
    "decimal-part": ("[0-9]{1,16}", ()),
    "integral-part": ("[0] | [1-9] [0-9]{0,15}", ()),
    "number": ('("-"? integral-part) ("." decimal-part)? ([eE] [-+]? integral-part)? space',
               ("integral-part", "decimal-part")),
    "integer": ('("-"? integral-part) space', ("integral-part",)),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ("," space string ":" space value)* )? "}" space',
               ("string", "value")),
    "array": ('"[" space ( value ("," space value)* )? "]" space', ("value",)),
    "uuid": ('"\\"" [0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
             '[0-9a-fA-F]{12} "\\"" space', ()),
    "char": ('[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})', ()),
    "string": ('"\\"" char* "\\"" space', ("char",)),
    "null": ('"null" space', ()),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )', ()),
    "time": ('([01] [0-9] | "2" [0-3]) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | ( "+" | "-" ) ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "date-string": ('"\\"" date "\\"" space', ("date",)),
    "time-string": ('"\\"" time "\\"" space', ("time",)),
    "date-time-string": ('"\\"" date-time "\\"" space', ("date-time",)),
}
STRING_FORMATS = {"date": "date-string", "time": "time-string", "date-time": "date-time-string", "uuid": "uuid"}

ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "readOnly",
               "writeOnly", "deprecated", "$defs", "definitions", "nullable"}
KEYWORDS_BY_TYPE = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
    "string": {"format", "minLength", "maxLength"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
}
MAX_INT_DIGITS = 16  # llama.cpp's integral-part allows 16 digits
COMMON_KEYWORDS = {"type", "enum", "const", "anyOf", "oneOf", "$ref"}


def gbnf_literal(text: str) -> str:
    """A GBNF string literal matching exactly `text`."""
    out = []
    for ch in text:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _repeat(lo: int, hi: int | None) -> str:
    if hi is None:
        return "*" if lo == 0 else ("+" if lo == 1 else f"{{{lo},}}")
    if (lo, hi) == (0, 1):
        return "?"
    return f"{{{lo}}}" if lo == hi else f"{{{lo},{hi}}}"


def _digit_range(lo: int, hi: int) -> list[str]:
    """GBNF sequences matching exactly the decimal numbers in [lo, hi] (0 <= lo <= hi)."""
    alternatives = []
    while len(str(lo)) < len(str(hi)):  # split by digit count
        top = 10 ** len(str(lo)) - 1
        alternatives += _same_length_range(str(lo), str(top))
        lo = top + 1
    return alternatives + _same_length_range(str(lo), str(hi))


def _same_length_range(lo: str, hi: str) -> list[str]:
    """Digit strings of equal length between lo and hi, as GBNF sequences."""
    if len(lo) == 1:
        return [f"[{lo}-{hi}]" if lo != hi else f'"{lo}"']
    rest = len(lo) - 1
    if lo[1:] == "0" * rest and hi[1:] == "9" * rest:  # whole blocks: [a-b] [0-9]{n}
        head = f"[{lo[0]}-{hi[0]}]" if lo[0] != hi[0] else f'"{lo[0]}"'
        return [f"{head} [0-9]{{{rest}}}"]
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" ({" | ".join(_same_length_range(lo[1:], hi[1:]))})']
    out = [f'"{lo[0]}" ({" | ".join(_same_length_range(lo[1:], "9" * rest))})']
    if int(hi[0]) - int(lo[0]) >= 2:
        out.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}] [0-9]{{{rest}}}")
    out.append(f'"{hi[0]}" ({" | ".join(_same_length_range("0" * rest, hi[1:]))})')
    return out


class SchemaConverter:
    """Accumulates named rules while visiting a schema."""

    def __init__(self, root_schema: dict, limits: GrammarLimits = DEFAULT_LIMITS):
        self.root_schema = root_schema
        self.limits = limits
        self.rules: dict[str, str] = {}
        self.size = 0  # characters of the rendered rules so far
        self.depth = 0  # visits in progress
        self.ref_rules: dict[str, str] = {}
        self._named: dict[tuple[str, str], str] = {}  # (name, body) -> the rule add_rule made
        self._suffix: dict[str, int] = {}  # name -> where add_rule's search for a free name resumes
        self.set_rule("space", SPACE_RULE)

    def set_rule(self, name: str, body: str) -> None:
        old = self.rules.get(name)
        self.size += len(body) - (len(old) if old is not None else -len(name) - 6)  # "name ::= body\n"
        if self.size > self.limits.max_grammar_bytes:
            raise GrammarLimitError(f"the grammar made from the JSON schema is longer than "
                                    f"{self.limits.max_grammar_bytes} bytes")
        self.rules[name] = body

    def add_rule(self, name: str, body: str) -> str:
        """Adds a rule named after `name` (a numbered variant if taken by another body)."""
        name = re.sub(r"[^a-zA-Z0-9-]+", "-", name).strip("-") or "rule"
        same = self._named.get((name, body))
        if same is not None and self.rules.get(same) == body:
            return same
        candidate = name
        if name in self.rules and self.rules[name] != body:
            i = self._suffix.get(name, 1)  # names before it are all taken
            candidate = f"{name}{i}"
            while candidate in self.rules and self.rules[candidate] != body:
                i += 1
                candidate = f"{name}{i}"
            self._suffix[name] = i + 1
        self._named[(name, body)] = candidate
        self.set_rule(candidate, body)
        return candidate

    def primitive(self, name: str) -> str:
        if name not in self.rules:
            body, deps = PRIMITIVES[name]
            self.set_rule(name, body)
            for dep in deps:
                self.primitive(dep)
        return name

    def resolve_ref(self, ref: str) -> str:
        if ref in self.ref_rules:
            return self.ref_rules[ref]
        if not isinstance(ref, str) or not ref.startswith("#"):
            raise GrammarError(f"unsupported $ref {ref!r}: only local references (#/...) are supported")
        target = resolve_pointer(self.root_schema, ref)
        name = "ref-" + (ref.rsplit("/", 1)[-1] or "root")
        name = self.add_rule(name, f"<pending {ref}>")  # a placeholder no other ref can share
        self.ref_rules[ref] = name
        self.set_rule(name, self.visit(target, name, inline=True))
        return name

    # -- visiting ---------------------------------------------------------------------------
    def visit(self, schema: Any, name: str, inline: bool = False) -> str:
        """Returns a rule reference for `schema` (or, with inline=True, a rule body)."""
        if self.depth >= self.limits.max_nesting:
            raise GrammarLimitError(f"JSON schema nested deeper than {self.limits.max_nesting} levels "
                                    "(counting $ref chains)")
        self.depth += 1
        try:
            body = self.body(schema, name)
        finally:
            self.depth -= 1
        return body if inline else self.add_rule(name, body)

    def body(self, schema: Any, name: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise GrammarError(f"schema at {name!r} is false: no value can match")
        if not isinstance(schema, dict):
            raise GrammarError(f"schema at {name!r} must be an object or a boolean")
        self.check_keywords(schema, name)
        if "$ref" in schema:
            return self.resolve_ref(schema["$ref"])
        for key in ("anyOf", "oneOf"):
            if key in schema:
                subs = schema[key]
                if not isinstance(subs, list) or not subs:
                    raise GrammarError(f"{key} at {name!r} must be a non-empty list")
                return " | ".join(self.visit(s, f"{name}-{i}") for i, s in enumerate(subs))
        if "const" in schema:
            return gbnf_literal(json.dumps(schema["const"], ensure_ascii=False)) + " space"
        if "enum" in schema:
            values = schema["enum"]
            if not isinstance(values, list) or not values:
                raise GrammarError(f"enum at {name!r} must be a non-empty list")
            return "(" + " | ".join(gbnf_literal(json.dumps(v, ensure_ascii=False)) for v in values) + ") space"
        schema_type = schema.get("type")
        if isinstance(schema_type, list):
            rest = {k: v for k, v in schema.items() if k != "type"}
            return " | ".join(self.visit({**rest, "type": t}, f"{name}-{t}") for t in schema_type)
        if schema_type is None:
            if {"properties", "additionalProperties"} & schema.keys():
                schema_type = "object"
            elif {"items", "prefixItems"} & schema.keys():
                schema_type = "array"
            else:
                return self.primitive("value")
        if schema_type == "object":
            if not {"properties", "additionalProperties", "required"} & schema.keys():
                return self.primitive("object")  # a bare {"type": "object"}: any object
            return self.object_body(schema, name)
        if schema_type == "array":
            return self.array_body(schema, name)
        if schema_type == "string":
            return self.string_body(schema, name)
        if schema_type == "integer" and {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"} & schema.keys():
            return self.integer_range_body(schema, name)
        if schema_type in ("number", "integer", "boolean", "null"):
            return self.primitive(schema_type)
        raise GrammarError(f"unsupported type {schema_type!r} at {name!r}")

    def check_keywords(self, schema: dict, name: str) -> None:
        allowed = ANNOTATIONS | COMMON_KEYWORDS
        types = schema.get("type")
        types = types if isinstance(types, list) else [types] if types else list(KEYWORDS_BY_TYPE)
        for t in types:
            allowed = allowed | KEYWORDS_BY_TYPE.get(t, set())
        unknown = sorted(set(schema) - allowed)
        if unknown:
            raise GrammarError(f"unsupported JSON schema keyword(s) {unknown} at {name!r}")

    def object_body(self, schema: dict, name: str) -> str:
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            raise GrammarError(f"properties at {name!r} must be an object")
        required = schema.get("required", [])
        if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
            raise GrammarError(f"required at {name!r} must be a list of strings")
        props = dict(properties)
        for key in required:
            props.setdefault(key, {})
        kv_rules = {}
        for key, sub in props.items():
            value_rule = self.visit(sub, f"{name}-{key}")
            kv_rules[key] = self.add_rule(f"{name}-{key}-kv",
                                          f'{gbnf_literal(json.dumps(key, ensure_ascii=False))} space ":" space {value_rule}')
        required_keys = [k for k in props if k in required]
        optional = [(kv_rules[k], False) for k in props if k not in required]
        additional = schema.get("additionalProperties", False)
        if additional is not False:
            value_rule = self.visit(additional if isinstance(additional, dict) else {}, f"{name}-additional")
            optional.append((self.add_rule(f"{name}-additional-kv", f'string ":" space {value_rule}'), True))
            self.primitive("string")
        parts = ['"{" space']
        if required_keys:
            parts.append(' "," space '.join(kv_rules[k] for k in required_keys))
        if optional:
            rests = self.rest_rules(optional, name)
            alternatives = " | ".join(self.optional_chain(optional, i, rests) for i in range(len(optional)))
            parts.append(f'( "," space ( {alternatives} ) )?' if required_keys else f"( {alternatives} )?")
        parts.append('"}" space')
        return " ".join(parts)

    def optional_chain(self, optional: list[tuple[str, bool]], start: int, rests: dict[int, str]) -> str:
        """kv_start followed by any in-order subset of the later optional properties."""
        kv, repeatable = optional[start]
        text = kv + (f' ( "," space {kv} )*' if repeatable else "")
        if start + 1 < len(optional):
            text += " " + rests[start + 1]
        return text

    def rest_rules(self, optional: list[tuple[str, bool]], name: str) -> dict[int, str]:
        """rests[i]: rule for any in-order subset of the optional properties from i on (i >= 1),
        made once each, last first (a chain: no recursion, linear in the properties)."""
        rests: dict[int, str] = {}
        for start in range(len(optional) - 1, 0, -1):
            kv, repeatable = optional[start]
            body = f'( "," space {kv} )' + ("*" if repeatable else "?")
            if start + 1 < len(optional):
                body += " " + rests[start + 1]
            rests[start] = self.add_rule(f"{name}-rest-{start}", body)
        return rests

    def array_body(self, schema: dict, name: str) -> str:
        lo = schema.get("minItems", 0)
        hi = schema.get("maxItems")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise GrammarError(f"invalid minItems/maxItems at {name!r}")
        if "prefixItems" in schema:
            items = schema["prefixItems"]
            if not isinstance(items, list) or "items" in schema or "minItems" in schema or "maxItems" in schema:
                raise GrammarError(f"prefixItems at {name!r}: only a plain tuple list is supported")
            refs = [self.visit(s, f"{name}-{i}") for i, s in enumerate(items)]
            return '"[" space ' + ' "," space '.join(refs) + (" " if refs else "") + '"]" space'
        item = self.visit(schema.get("items", {}), f"{name}-item")
        if hi == 0:
            return '"[" space "]" space'
        more = _repeat(max(lo - 1, 0), None if hi is None else hi - 1)
        seq = f'{item} ( "," space {item} ){more}'
        return f'"[" space {seq if lo > 0 else "( " + seq + " )?"} "]" space'

    def string_body(self, schema: dict, name: str) -> str:
        if "format" in schema:
            fmt = schema["format"]
            if fmt not in STRING_FORMATS or {"minLength", "maxLength"} & schema.keys():
                raise GrammarError(f"unsupported string format {fmt!r} at {name!r}")
            return self.primitive(STRING_FORMATS[fmt])
        lo = schema.get("minLength", 0)
        hi = schema.get("maxLength")
        if not isinstance(lo, int) or lo < 0 or (hi is not None and (not isinstance(hi, int) or hi < lo)):
            raise GrammarError(f"invalid minLength/maxLength at {name!r}")
        if lo == 0 and hi is None:
            return self.primitive("string")
        self.primitive("char")
        return f'"\\"" char{_repeat(lo, hi)} "\\"" space'

    def integer_range_body(self, schema: dict, name: str) -> str:
        """An integer within [minimum, maximum] (exclusive bounds shift by one)."""
        bounds = {}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if key in schema:
                value = schema[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
                    raise GrammarError(f"{key} at {name!r} must be an integer for an integer schema")
                bounds[key] = int(value)
        lo_candidates = [bounds.get("minimum"), bounds["exclusiveMinimum"] + 1 if "exclusiveMinimum" in bounds else None]
        hi_candidates = [bounds.get("maximum"), bounds["exclusiveMaximum"] - 1 if "exclusiveMaximum" in bounds else None]
        lo = max((v for v in lo_candidates if v is not None), default=None)
        hi = min((v for v in hi_candidates if v is not None), default=None)
        if lo is not None and hi is not None and lo > hi:
            raise GrammarError(f"no integer satisfies the bounds at {name!r}")
        limit = 10 ** MAX_INT_DIGITS - 1
        if max(abs(v) for v in (lo, hi) if v is not None) > limit:
            raise GrammarError(f"integer bounds at {name!r} exceed {MAX_INT_DIGITS} digits")
        alternatives = []
        # non-negative part [max(lo, 0), hi or limit], negative part -[max(-hi, 1), -lo or limit]
        pos_lo, pos_hi = max(lo if lo is not None else 0, 0), hi if hi is not None else limit
        if pos_lo <= pos_hi:
            alternatives += _digit_range(pos_lo, pos_hi)
        neg_lo, neg_hi = max(-hi if hi is not None else 1, 1), -lo if lo is not None else limit
        if neg_lo <= neg_hi:
            alternatives += [f'"-" {alt}' for alt in _digit_range(neg_lo, neg_hi)]
        return "(" + " | ".join(alternatives) + ") space"

    def render(self, root_body: str) -> str:
        self.set_rule("root", root_body)
        names = ["root"] + sorted(n for n in self.rules if n != "root")
        text = "\n".join(f"{n} ::= {self.rules[n]}" for n in names) + "\n"
        if len(text.encode("utf-8", "surrogatepass")) > self.limits.max_grammar_bytes:
            raise GrammarLimitError(f"the grammar made from the JSON schema is longer than "
                                    f"{self.limits.max_grammar_bytes} bytes")
        return text


def json_schema_to_grammar(schema: Any, *, limits: GrammarLimits | None = None) -> str:
    """GBNF text for documents valid under `schema`: GrammarError if unsupported,
    SchemaReferenceError (a GrammarError) if a local $ref does not resolve, GrammarLimitError
    (a GrammarError) if beyond `limits` (default: GrammarLimits())."""
    limits = DEFAULT_LIMITS if limits is None else limits
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as exc:
            raise GrammarError(f"json_schema is not valid JSON: {exc}") from None
        except RecursionError:
            raise GrammarLimitError(f"JSON schema nested deeper than {limits.max_nesting} levels") from None
    check_schema(schema, limits)
    converter = SchemaConverter(schema if isinstance(schema, dict) else {}, limits)
    try:
        return converter.render(converter.visit(schema, "root", inline=True))
    except RecursionError:  # a safety net: nesting is bounded well below the recursion limit
        raise GrammarLimitError("JSON schema nested too deeply to convert") from None


def json_object_grammar() -> str:
    """Grammar for `response_format: {"type": "json_object"}`: any JSON object."""
    return json_schema_to_grammar({"type": "object", "additionalProperties": True})
