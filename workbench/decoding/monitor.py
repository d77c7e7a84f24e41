"""Monitor-guided decoding: static analysis of the code written so far masks tokens that would start an
identifier that is not in scope there. LOSSY: the target's own choice is overruled where the monitor masks it.

Paper: Agrawal et al., "Monitor-Guided Decoding of Code LMs with Static Analysis of Repository Context"
(arXiv 2306.10763, NeurIPS 2023). A monitor watches the code being generated; at trigger points (there, an
object dereference `obj.`) it asks a static analysis (a language server) which identifiers are valid, and
masks the logits of tokens inconsistent with every one of them, so the model can only write a name that
exists. Here the monitor is Python's own analysis of the Python code so far (inside the open Markdown code
block of the prompt and output, or all of the prompt and output with `region=all`, for completion prompts):
- `tokenize` tells whether the end of the code is inside a string or comment (no trigger there) and how
  deep in brackets it is; `ast` parses the longest parseable prefix of the complete lines (an open block
  gets a `pass`), and `symtable` gives the names bound in each scope enclosing the current line.
- Attribute points (`obj.`, also `obj` followed by a token that starts with `.`): `obj` is an import of a
  standard-library module, a name imported from one, a builtin type or a class defined in the code (with no
  unknown bases); its members are the module's or class's attributes (`dir`) or the class body's names.
- Name points (`names=true`): after `=`, `return`, `if`, `while`, `and`, `or`, `not`, `in`, comparison and
  arithmetic operators, outside brackets and lambdas: the name must be bound in an enclosing scope (function
  scopes, then the module, as Python resolves it), a builtin, a keyword, or a word of the complete lines that
  do not parse yet (a statement still open).
A token is masked when its text continues or starts an identifier at such a point and the identifier it
makes is not a prefix of a valid name (or, when the token also ends it, not a valid name); tokens that do
not start an identifier are never masked. Acceptance is then matching against the masked distribution (the
target's argmax, or a draw from it), so any drafter works; drafts the monitor masks are rejected.

Left out: the paper's language server and type inference (the types of local variables, `self.`, call
results and third-party packages are unknown here, so no trigger fires on them); names used before they are
defined in the code (a function calling one written below it) count as not in scope; code in the prompt's
closed code blocks is not analysed; and its other monitors (argument counts, enum constants, typestate).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import io
import keyword
import re
import symtable
import sys
import tokenize
import types
from dataclasses import dataclass, field

import torch

from workbench.decoding.base import ROOT, Acceptance, Acceptor, DecodeState, DraftTree
from workbench.errors import SpecError
from workbench.registry import param, register
from workbench.sampling import Sampler

FENCE = "```"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
_CHAIN = re.compile(r"(?:^|[^\w.)\]}'\"])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\s*\.$")
_NAME_TRIGGER = re.compile(r"(?:(?:^|\W)(?:return|yield|if|elif|while|assert|not|and|or|in|is)|[=+\-/%<]|[^-]>)$")
_TOKEN = re.compile(r"(?P<lead>[ \t]+|\.)?(?P<run>[A-Za-z0-9_]+)(?P<rest>.*)$", re.S)
# Standard-library modules whose import has side effects (a browser, a window, a printed poem) are never imported.
_UNSAFE_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "__main__", "__hello__"}
_ALWAYS = set(dir(builtins)) | set(keyword.kwlist) | set(keyword.softkwlist)


class TokenTable:
    """Every vocabulary token's text split for the monitor: what comes before an identifier run (nothing,
    whitespace, a dot), the run, and whether the token ends with it. Built once per tokenizer."""

    def __init__(self, pieces: list[str]):
        self.index: dict[tuple[str, str, bool], list[int]] = {}  # (lead kind, run, ends with the run) -> ids
        kinds: dict[str, list[int]] = {kind: [] for kind in ("direct", "ws", "dot")}
        for i, piece in enumerate(pieces):
            m = _TOKEN.match(piece)
            if not m:
                continue
            lead = m["lead"] or ""
            kind = "direct" if not lead else "dot" if lead == "." else "ws"
            kinds[kind].append(i)
            self.index.setdefault((kind, m["run"], not m["rest"]), []).append(i)
        self.kinds = {kind: self._flags(len(pieces), ids) for kind, ids in kinds.items()}
        self.kinds["text"] = torch.tensor([bool(p) for p in pieces])  # tokens with text (not empty specials)

    def ids(self, kind: str, run: str, ends: bool) -> list[int]:
        return self.index.get((kind, run, ends), [])

    def starting(self, kind: str, names: set[str]) -> torch.Tensor:
        """Tokens of `kind` that start an identifier (after their lead) inconsistent with every name: [V] bool."""
        ok = [i for n in names for j in range(1, len(n)) for i in self.ids(kind, n[:j], True)]
        ok += [i for n in names for i in self.ids(kind, n, True) + self.ids(kind, n, False)]
        return self._masked(self.kinds[kind], ok) & ~self._digit_start(kind)

    def continuing(self, partial: str, names: set[str]) -> torch.Tensor:
        """Tokens inconsistent with every name, given the identifier `partial` written so far: [V] bool."""
        ok: list[int] = []
        for n in names:
            if n.startswith(partial) and len(n) > len(partial):
                rest = n[len(partial):]
                ok += [i for j in range(1, len(rest) + 1) for i in self.ids("direct", rest[:j], True)]
                ok += self.ids("direct", rest, False)
        masked = self._masked(self.kinds["direct"], ok)
        if partial not in names:  # a token that ends the identifier here would leave an unknown name
            masked |= self.kinds["text"] & ~self.kinds["direct"]
        return masked

    def _digit_start(self, kind: str) -> torch.Tensor:
        """Tokens whose run starts with a digit (a number, not an identifier): never masked as identifiers."""
        key = f"digits:{kind}"
        if key not in self.kinds:
            ids = [i for (k, run, _), ids in self.index.items() if k == kind and run[0].isdigit() for i in ids]
            self.kinds[key] = self._flags(len(self.kinds[kind]), ids)
        return self.kinds[key]

    @staticmethod
    def _flags(size: int, ids: list[int]) -> torch.Tensor:
        flags = torch.zeros(size, dtype=torch.bool)
        flags[torch.tensor(ids, dtype=torch.long)] = True
        return flags

    @staticmethod
    def _masked(candidates: torch.Tensor, ok: list[int]) -> torch.Tensor:
        masked = candidates.clone()
        if ok:
            masked[torch.tensor(ok, dtype=torch.long)] = False
        return masked


@dataclass
class Scope:
    """What the static analysis knows at the current line."""

    names: set[str]  # names bound in the enclosing scopes (Python's resolution order), plus unparsed words
    tree: ast.Module | None  # the longest parseable prefix's tree
    local_names: set[str]  # bound in an enclosing function scope (unknown types: no attribute trigger)


class CodeMonitor:
    """The static analysis: where in the code an identifier is expected, and which identifiers are valid."""

    def __init__(self, table: TokenTable, names: bool):
        self.table, self.names = table, names
        self._scopes: dict[tuple[str, int], Scope] = {}  # (complete lines, indent) -> scope; one run's code
        self._members: dict[str, set[str] | None] = {}

    def masked(self, code: str) -> torch.Tensor | None:
        """[V] bool: the tokens that may not come next after `code`, or None where the monitor does not fire."""
        depth, quiet = _lexical_state(code)
        if quiet:  # inside a string or a comment
            return None
        line = code[code.rfind("\n") + 1:]
        m = _IDENT.search(line)
        partial = m.group(0) if m and (m.start() == 0 or not line[m.start() - 1].isalnum()) else ""
        head = line[: len(line) - len(partial)]
        stripped = head.rstrip(" \t")
        masks: list[torch.Tensor] = []
        chain = _CHAIN.search(stripped)
        if chain:  # obj.<partial>
            members = self._resolve(chain.group(1), code, line)
            if members is not None:
                masks.append(self.table.continuing(partial, members) if partial else
                             self.table.starting("direct", members) | self.table.starting("ws", members))
        elif self.names and depth == 0 and "lambda" not in line and _NAME_TRIGGER.search(stripped):
            names = self._scope(code, line).names
            masks.append(self.table.continuing(partial, names) if partial else
                         self.table.starting("direct", names) | self.table.starting("ws", names))
        if partial and not chain and self.names and depth == 0 and partial in _TRIGGER_WORDS and \
                "lambda" not in line and (not head.strip() or head.endswith((" ", "\t"))):
            masks.append(self.table.starting("ws", self._scope(code, line).names))  # `return` + ` name`
        if partial:  # `obj` + `.member`: the token brings the dot
            members = self._resolve(_chain_ending(head, partial), code, line)
            if members is not None:
                masks.append(self.table.starting("dot", members))
        if not masks:
            return None
        out = torch.stack(masks).any(0)
        return None if bool(out[self.table.kinds["text"]].all()) else out  # never mask every token

    def _scope(self, code: str, line: str) -> Scope:
        complete = code[: len(code) - len(line)]
        indent = len(line) - len(line.lstrip(" \t"))
        key = (complete, indent)
        if key not in self._scopes:
            self._scopes[key] = _scope_at(complete, indent)
        return self._scopes[key]

    def _resolve(self, chain: str, code: str, line: str) -> set[str] | None:
        """The members of the object named by a dotted chain, where the analysis knows them."""
        scope = self._scope(code, line)
        base, *rest = chain.split(".")
        if base in scope.local_names or scope.tree is None:
            return None
        obj = _binding(scope.tree, base)
        if isinstance(obj, ast.ClassDef):
            return None if rest else _class_members(scope.tree, obj)
        if obj is None and base in dir(builtins) and base not in scope.names - _ALWAYS:
            obj = getattr(builtins, base)
            if not isinstance(obj, type):
                return None
        for name in rest:
            obj = getattr(obj, name, None) if obj is not None else None
        if obj is None or not isinstance(obj, (type, types.ModuleType)):
            return None
        key = f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', ''))}"
        if key not in self._members:
            self._members[key] = set(dir(obj))
        return self._members[key]


_TRIGGER_WORDS = {"return", "yield", "if", "elif", "while", "assert", "not", "and", "or", "in", "is"}


def _chain_ending(head: str, partial: str) -> str:
    """The dotted chain ending in `partial` (e.g. `os.path` for head `x = os.` and partial `path`)."""
    m = re.search(r"((?:[A-Za-z_]\w*\.)*)$", head)
    prefix = m.group(1) if m else ""
    return prefix + partial if not head[: len(head) - len(prefix)].endswith((".", ")", "]")) else ""


def _lexical_state(code: str) -> tuple[int, bool]:
    """(bracket depth at the end of `code`, whether the end is inside a string or a comment)."""
    depth, last_line = 0, code.count("\n") + 1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(code).readline):
            if tok.type == tokenize.OP and tok.string in "([{":
                depth += 1
            elif tok.type == tokenize.OP and tok.string in ")]}":
                depth = max(depth - 1, 0)
            elif tok.start[0] == last_line and (tok.type == tokenize.COMMENT or (
                    tok.type == tokenize.ERRORTOKEN and tok.string[:1] in "'\"")):
                return depth, True
    except tokenize.TokenError as err:
        return depth, "string" in str(err)
    except (SyntaxError, IndentationError):
        return depth, True  # a line the tokenizer refuses: keep quiet
    return depth, False


def _parse_prefix(lines: list[str]) -> tuple[ast.Module, str, int] | None:
    """The longest prefix of the complete lines that parses (an open block completed with `pass`): its tree,
    its source and how many of the lines it holds."""
    for end in range(len(lines), max(len(lines) - 30, 0) - 1, -1):
        source = "".join(lines[:end])
        last = next((x for x in reversed(lines[:end]) if x.strip()), "")
        tries = [source]
        if last.rstrip().endswith(":"):
            tries.append(source + " " * (len(last) - len(last.lstrip()) + 4) + "pass\n")
        for text in tries:
            try:
                return ast.parse(text), text, end
            except (SyntaxError, ValueError):
                continue
    return None


def _scope_at(complete: str, indent: int) -> Scope:
    """The names in scope at a new line indented by `indent` after the complete lines `complete`."""
    lines = complete.splitlines(keepends=True)
    parsed = _parse_prefix(lines)
    words = set(re.findall(r"[A-Za-z_]\w*", "".join(lines[parsed[2] if parsed else 0:])))  # not parsed yet
    if parsed is None:
        return Scope(_ALWAYS | words, None, set())
    tree, source, _ = parsed
    table = symtable.symtable(source, "<output>", "exec")
    open_defs = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                 and n.col_offset < indent and _still_open(n, lines, len(lines) + 1)]
    open_defs.sort(key=lambda n: n.col_offset)
    tables, current = [table], table
    for node in open_defs:  # the symbol tables of the enclosing definitions, outermost first
        child = next((c for c in current.get_children() if c.get_name() == node.name and c.get_lineno() in
                      (node.lineno, *(d.lineno for d in node.decorator_list))), None)
        if child is None:
            break
        tables.append(child)
        current = child
    names, local = set(), set()
    for depth, t in enumerate(tables):
        if t.get_type() == "class" and depth != len(tables) - 1:
            continue  # a class body's names are not visible inside its methods
        bound = {s.get_name() for s in t.get_symbols() if s.is_assigned() or s.is_parameter() or s.is_imported()
                 or s.is_namespace()}
        names |= bound
        if t.get_type() == "function":
            local |= {s.get_name() for s in t.get_symbols() if (s.is_assigned() or s.is_parameter())
                      and not s.is_imported()}
    return Scope(names | _ALWAYS | words, tree, local)


def _still_open(node: ast.AST, lines: list[str], current: int) -> bool:
    """Whether the definition's body goes on at line `current`: no line since its end is indented at or
    left of it."""
    for text in lines[node.end_lineno: current - 1]:
        if text.strip() and len(text) - len(text.lstrip()) <= node.col_offset:
            return False
    return True


def _binding(tree: ast.Module, name: str) -> object:
    """What a name not bound in a function refers to: an imported standard-library module or attribute (an
    import anywhere), a class defined at module level, or None when unknown."""
    found: object = None
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] + tree.body
    for node in sorted(nodes, key=lambda n: (n.lineno, n.col_offset)):
        if isinstance(node, ast.ClassDef) and node.name == name:
            found = node
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if (alias.asname or alias.name.split(".")[0]) == name:
                    found = _import(alias.name if alias.asname else alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    module = _import(node.module)
                    found = getattr(module, alias.name, None) if module is not None else None
                    if found is None and module is not None:
                        found = _import(f"{node.module}.{alias.name}")
        elif name in _rebound(node):
            found = None  # rebound to something the analysis does not know
    return found


def _rebound(node: ast.AST) -> set[str]:
    """Module-level names a function definition or an assignment binds."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return {node.name}
    if isinstance(node, ast.Assign):
        return {t.id for target in node.targets for t in ast.walk(target) if isinstance(t, ast.Name)}
    return set()


def _import(module: str) -> object:
    """A standard-library module (imported without side effects), or None."""
    top = module.split(".")[0]
    if top not in sys.stdlib_module_names or top in _UNSAFE_MODULES:
        return None
    try:
        return importlib.import_module(module)
    except Exception:  # a module missing from this build of Python, or failing on this platform
        return None


def _class_members(tree: ast.Module, node: ast.ClassDef) -> set[str] | None:
    """The names a class defined in the code has: its body's, its known bases', and object's."""
    members = set(dir(object))
    for base in node.bases:
        known = _binding(tree, base.id) if isinstance(base, ast.Name) else None
        if isinstance(known, ast.ClassDef) and known is not node:
            inherited = _class_members(tree, known)
        elif isinstance(known, type) or isinstance(base, ast.Name) and isinstance(getattr(builtins, base.id, None),
                                                                                  type):
            inherited = set(dir(known if isinstance(known, type) else getattr(builtins, base.id)))
        else:
            return None  # an unknown base: its members are unknown
        if inherited is None:
            return None
        members |= inherited
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            members.add(item.name)
        elif isinstance(item, (ast.Assign, ast.AnnAssign)):
            targets = item.targets if isinstance(item, ast.Assign) else [item.target]
            members |= {t.id for t in targets if isinstance(t, ast.Name)}
    return members


def code_of(text: str, region: str) -> str | None:
    """The code the monitor analyses in the text so far (prompt and output): inside its last open code fence
    (`fenced`), or all of it (`all`); None outside code."""
    if region == "all":
        return text
    if text.count(FENCE) % 2 == 0:
        return None
    body = text[text.rfind(FENCE) + len(FENCE):]
    newline = body.find("\n")
    return None if newline < 0 else body[newline + 1:]  # the fence's own line names the language


@register("acceptance", "monitor", lossless=False)
@dataclass
class MonitorAcceptance(Acceptor):
    """Static analysis of the code so far masks tokens that start identifiers not in scope (lossy)."""

    default_drafter = "plain"
    names: bool = param(True, "also check plain name uses (after =, return, operators...); false: only obj. "
                        "attributes")
    region: str = param("fenced", "fenced: the code inside the open ``` block (of the prompt and output); all: "
                        "prompt and output are code (completion prompts)", choices=("fenced", "all"))
    _state: DecodeState | None = field(init=False, default=None, repr=False)
    _monitor: CodeMonitor | None = field(init=False, default=None, repr=False)
    _prompt: str = field(init=False, default="", repr=False)

    def begin(self, state: DecodeState) -> None:
        if state.tokenizer is None:
            raise SpecError("monitor reads the output as code text, and this model has no tokenizer; use a model "
                            "with one (e.g. smollm2-135m)")
        key = "monitor:tokens"
        if key not in state.memory:  # one table per loaded model (half a second for 49k tokens)
            vocab = state.model.config.vocab_size
            state.memory[key] = TokenTable(state.tokenizer.batch_decode([[i] for i in range(vocab)]))
        self._state, self._monitor = state, CodeMonitor(state.memory[key], self.names)
        self._prompt = state.tokenizer.decode(state.prompt_ids)

    def masked(self, generated: list[int]) -> torch.Tensor | None:
        """[V] bool of the tokens the monitor forbids after the prompt and the output `generated`, or None."""
        code = code_of(self._prompt + self._state.tokenizer.decode(generated), self.region)
        return None if code is None else self._monitor.masked(code)

    def accept(self, tree: DraftTree, logits: torch.Tensor, probs: torch.Tensor, sampler: Sampler) -> Acceptance:
        # Matching (decoding/match.py) against the monitored distribution of each row on the walk.
        children = tree.children()
        generated, accepted, node = list(self._state.generated), [], ROOT
        while True:
            row = node + 1
            masked = self.masked(generated)
            if masked is None:
                token = int(logits[row].argmax()) if sampler.greedy else int(sampler.draw(probs[row]))
            else:
                guided = logits[row].masked_fill(masked.to(logits.device), float("-inf"))
                token = int(guided.argmax()) if sampler.greedy else int(sampler.draw(sampler.probs(guided)))
            match = next((c for c in children[node] if tree.tokens[c] == token), None)
            if match is None:
                return Acceptance(accepted, token)
            accepted.append(match)
            generated.append(token)
            node = match
