"""Small Python programs whose printed output a model must predict: the code-reasoning evaluation.

A seeded generator writes programs of a few statements — assignments, integer arithmetic, conditionals,
`for` and `while` loops, list and string operations, small functions and their calls — that end by printing
something. The ground truth is never computed by us: each program is executed by a fresh Python in a
subprocess (`run_python`) with a time limit, a memory limit and no network; programs that fail, time out or
print something unsuitable (too long, an empty line, a line starting with `#`) are dropped.

Held-out and training programs are split by a hash of the program's text, like files in the corpus: a program
belongs to the held-out universe iff `is_held_out(source)`. `held_out_set` draws only from it (with a fixed
seed); `training_programs` draws only outside it, with any seed, so the two can never share a program whatever
their sizes.

The text a model sees is `Program.example()`: the program, then `# output:`, the printed lines, then `# end`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

TEST_SEED = 20251024  # the held-out test set is always drawn with this seed
HELD_OUT_BUCKETS = 10  # 1 in HELD_OUT_BUCKETS programs (by hash of the text) is held out
OUTPUT_MARK = "# output:\n"
END_MARK = "# end\n"
MAX_OUTPUT_CHARS = 80
MAX_OUTPUT_LINES = 4

# Runs inside the child before the untrusted code. The audit hook cannot be removed by the code it guards,
# and it fires in C for every socket creation and process spawn: no network, no processes.
_PRELUDE = r"""
import os, resource, sys
_limit = {memory}
resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))
resource.setrlimit(resource.RLIMIT_CPU, ({cpu}, {cpu}))
_BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
            "os.forkpty", "pty.spawn", "os.kill", "os.killpg")
def _guard(event, args):
    if event.startswith(_BLOCKED):
        raise PermissionError(f"{{event}} is not allowed in parloop's sandbox (no network, no processes)")
_source = sys.stdin.read()
sys.stdin = open(os.devnull)
sys.addaudithook(_guard)
del _guard
exec(compile(_source, "<program>", "exec"), {{"__name__": "__main__"}})
"""


@dataclass(frozen=True)
class ExecResult:
    """Outcome of one sandboxed run: `ok` means exit status 0 within the time limit."""

    returncode: int | None
    stdout: str
    stderr: str
    timed_out: bool

    @property
    def ok(self) -> bool:
        return not self.timed_out and self.returncode == 0


def run_python(source: str, timeout: float = 5.0, memory_bytes: int = 2 << 30) -> ExecResult:
    """Execute `source` in a fresh, isolated Python process (`python -I`) in an empty temporary directory.

    Limits: `timeout` seconds of wall time (the whole process group is killed after it), as much CPU time, and
    `memory_bytes` of address space; no sockets and no child processes (an audit hook refuses them); only the
    standard library (`-S`: no site-packages, which also starts several times faster). This keeps honest
    mistakes (infinite loops, runaway memory, a test that opens a connection) from harming the machine; it is
    not a security boundary against hostile code.
    """
    prelude = _PRELUDE.format(memory=int(memory_bytes), cpu=max(1, int(timeout) + 1))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "PYTHONHASHSEED": "0",
           "PYTHONIOENCODING": "utf-8"}
    with tempfile.TemporaryDirectory(prefix="parloop-run-") as cwd:
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", prelude], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=cwd, env=env,
                                start_new_session=True, text=True, encoding="utf-8", errors="replace")
        try:
            out, err = proc.communicate(source, timeout=timeout)
            return ExecResult(proc.returncode, out, err, timed_out=False)
        except subprocess.TimeoutExpired:
            # the session id is the child's pid: this reaches anything it managed to leave behind as well
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            return ExecResult(None, out, err, timed_out=True)


def run_many(sources: Sequence[str], timeout: float = 5.0, workers: int | None = None,
             desc: str | None = None) -> list[ExecResult]:
    """`run_python` over many sources, `workers` at a time (default: CPU count), results in input order."""
    workers = workers or os.cpu_count() or 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(lambda s: run_python(s, timeout), sources)
        return list(tqdm(results, total=len(sources), desc=desc, disable=desc is None, leave=False))


@dataclass(frozen=True)
class Program:
    """A generated program and what it prints (as recorded by executing it)."""

    source: str
    output: str

    def prompt(self) -> str:
        """What the model is given: the program and the output marker."""
        return self.source + OUTPUT_MARK

    def example(self) -> str:
        """The training text: prompt, output, end marker."""
        return self.prompt() + self.output + END_MARK


def read_prediction(generated: str) -> str:
    """The predicted output in a model's continuation of `Program.prompt()`: its lines up to the first empty
    line or line starting with `#` (the end marker, or any comment) — never a line a real output contains."""
    lines = []
    for line in generated.split("\n"):
        if not line.strip() or line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def is_correct(program: Program, generated: str) -> bool:
    """Exact match of the predicted output (trailing spaces ignored) against the recorded one."""
    want = [line.rstrip() for line in program.output.rstrip("\n").split("\n")]
    got = [line.rstrip() for line in read_prediction(generated).split("\n")]
    return got == want


def is_held_out(source: str) -> bool:
    """Does this program text belong to the held-out universe (1 in `HELD_OUT_BUCKETS`, by hash)?"""
    return int.from_bytes(hashlib.sha256(source.encode()).digest()[:8], "big") % HELD_OUT_BUCKETS == 0


# -- the generator -------------------------------------------------------------------------------------------

_INT_NAMES = ("a", "b", "c", "d", "n", "m", "x", "y", "k", "total", "count")
_LIST_NAMES = ("xs", "ys", "nums", "vals")
_STR_NAMES = ("s", "t", "word", "name")
_FUNC_NAMES = ("f", "g", "h", "step", "combine")
_WORDS = ("apple", "code", "loop", "tree", "data", "moon", "river", "stone", "cat", "python", "lamp", "sun")


class _Writer:
    """Writes one program. Tracks which names hold ints, lists and strings so most programs run; the rest (an
    index out of range, a name bound only in a branch not taken, ...) are dropped after execution."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.ints: list[str] = []
        self.lists: list[str] = []
        self.strs: list[str] = []
        self.funcs: list[str] = []
        self.lines: list[str] = []

    # expressions
    def lit(self, lo: int = 0, hi: int = 12) -> str:
        return str(self.rng.randint(lo, hi))

    def int_atom(self) -> str:
        r = self.rng.random()
        if self.ints and r < 0.55:
            return self.rng.choice(self.ints)
        if self.lists and r < 0.65:
            return f"len({self.rng.choice(self.lists)})"
        if self.strs and r < 0.7:
            return f"len({self.rng.choice(self.strs)})"
        return self.lit()

    def int_expr(self, depth: int = 0) -> str:
        r = self.rng.random()
        if depth >= 2 or r < 0.35:
            return self.int_atom()
        if r < 0.75:
            op = self.rng.choice(("+", "-", "*", "+", "-"))
            return f"{self.int_atom()} {op} {self.int_expr(depth + 1)}"
        if r < 0.85:
            return f"{self.int_atom()} {self.rng.choice(('//', '%'))} {self.lit(2, 5)}"
        if self.funcs and r < 0.92:
            return f"{self.rng.choice(self.funcs)}({self.int_atom()}, {self.int_atom()})"
        if self.lists and r < 0.96:
            xs = self.rng.choice(self.lists)
            index = self.rng.randint(-2, 2)
            return self.rng.choice((f"sum({xs})", f"max({xs})", f"min({xs})", f"{xs}[{index}]"))
        return f"{self.rng.choice(('max', 'min'))}({self.int_atom()}, {self.int_atom()})"

    def cond(self) -> str:
        r = self.rng.random()
        if self.strs and r < 0.15:
            return f"{self.rng.choice(self.strs)}.startswith({self.rng.choice('acdlmprst')!r})"
        if self.lists and r < 0.3:
            return f"len({self.rng.choice(self.lists)}) > {self.lit(0, 5)}"
        if r < 0.55:
            return f"{self.int_atom()} % 2 == {self.rng.randint(0, 1)}"
        return f"{self.int_atom()} {self.rng.choice(('>', '<', '>=', '<=', '==', '!='))} {self.int_expr(1)}"

    def list_expr(self) -> str:
        r = self.rng.random()
        if not self.lists or r < 0.35:
            return "[" + ", ".join(self.lit() for _ in range(self.rng.randint(1, 5))) + "]"
        xs = self.rng.choice(self.lists)
        if r < 0.45:
            lo = self.rng.randint(0, 4)
            return f"list(range({lo}, {lo + self.rng.randint(1, 5)}))"
        if r < 0.6:
            return f"[v {self.rng.choice(('*', '+', '-'))} {self.lit(1, 4)} for v in {xs}]"
        if r < 0.7:
            return f"[v for v in {xs} if v % 2 == {self.rng.randint(0, 1)}]"
        if r < 0.8:
            return f"sorted({xs}{', reverse=True' if self.rng.random() < 0.3 else ''})"
        if r < 0.9:
            return f"{xs}[{self.rng.randint(0, 2)}:{self.rng.randint(2, 5)}]"
        return f"{xs} + {self.rng.choice(self.lists)}"

    def str_expr(self) -> str:
        r = self.rng.random()
        if not self.strs or r < 0.3:
            return repr(self.rng.choice(_WORDS))
        s = self.rng.choice(self.strs)
        options = (f"{s} + {self.rng.choice(self.strs)}", f"{s}.upper()", f"{s}[::-1]",
                   f"{s}[{self.rng.randint(0, 2)}:{self.rng.randint(2, 6)}]", f"{s} * 2",
                   f"{s}.replace({self.rng.choice('aeiot')!r}, {self.rng.choice('xyz-')!r})",
                   f"str({self.int_atom()})", f"{s} + str({self.int_atom()})")
        return self.rng.choice(options)

    # statements
    def simple(self, indent: str, new_names: bool, avoid: tuple[str, ...] = ()) -> str:
        """One assignment or mutation. `new_names=False` inside branches and loop bodies, so that no name is bound
        on some paths only; names in `avoid` (a loop's counter, the list a loop walks) are not written."""
        pools = {"int": (self.ints, _INT_NAMES), "aug": (self.ints, ()), "list": (self.lists, _LIST_NAMES),
                 "append": (self.lists, ()), "str": (self.strs, _STR_NAMES)}
        kind = self.rng.choices(list(pools), weights=(4, 3, 2, 2, 2))[0]
        pool, fresh = pools[kind]
        candidates = [v for v in (fresh if new_names and fresh else pool) if v not in avoid]
        if not candidates:
            kind, (pool, fresh) = "int", pools["int"]
            candidates = [v for v in (fresh if new_names else pool) if v not in avoid]
        if not candidates:
            return f"{indent}pass"
        target = self.rng.choice(candidates)
        if kind == "aug":
            line = f"{target} {self.rng.choice(('+=', '-=', '*='))} {self.int_atom()}"
        elif kind == "append":
            line = (f"{target}.append({self.int_expr(1)})" if self.rng.random() < 0.7
                    else f"{target}.insert(0, {self.int_atom()})")
        else:
            make = {"int": self.int_expr, "list": self.list_expr, "str": self.str_expr}[kind]
            line = f"{target} = {make()}"
        if target not in pool:
            pool.append(target)
        return indent + line

    def statement(self) -> list[str]:
        kind = self.rng.choices(("simple", "if", "for", "while", "def", "call"),
                                weights=(6, 2, 2, 1, 1, 3 if self.funcs else 0))[0]
        if kind == "call":
            target = self.rng.choice(_INT_NAMES)
            line = f"{target} = {self.rng.choice(self.funcs)}({self.int_expr(1)}, {self.int_atom()})"
            if target not in self.ints:
                self.ints.append(target)
            return [line]
        if kind == "if" and self.ints:
            out = [f"if {self.cond()}:", self.simple("    ", False)]
            if self.rng.random() < 0.3:
                out += [f"elif {self.cond()}:", self.simple("    ", False)]
            if self.rng.random() < 0.6:
                out += ["else:", self.simple("    ", False)]
            return out
        if kind == "for" and self.ints:
            if self.lists and self.rng.random() < 0.5:
                walked = self.rng.choice(self.lists)
                head, avoid = f"for v in {walked}:", ("v", walked)  # growing the walked list never ends
            else:
                head, avoid = f"for i in range({self.lit(1, 5)}):", ("i",)
            self.ints.append(avoid[0])
            body = [self.simple("    ", False, avoid) for _ in range(self.rng.randint(1, 2))]
            if self.rng.random() < 0.15:
                body.append(f"    print({self.ints[-1]})")
            self.ints.pop()  # the loop variable may be unbound after a loop that never ran
            return [head, *body]
        if kind == "while" and self.ints:
            # the counter only ever decreases, by at least 1, so the loop ends
            var = self.rng.choice(self.ints)
            body = [f"    {var} -= {self.rng.randint(1, 3)}", self.simple("    ", False, (var,))]
            return [f"while {var} > {self.lit(0, 6)}:", *body]
        if kind == "def" and len(self.funcs) < 2:
            name = self.rng.choice([f for f in _FUNC_NAMES if f not in self.funcs])
            op1, op2 = self.rng.choice(("+", "-", "*")), self.rng.choice(("+", "-", "*"))
            body = [f"    return p {op1} q {op2} {self.lit(1, 5)}"]
            if self.rng.random() < 0.4:
                body = ["    if p > q:", f"        return p {op1} {self.lit(1, 5)}", f"    return q {op2} p"]
            self.funcs.append(name)
            return [f"def {name}(p, q):", *body]
        return [self.simple("", True)]

    def printed(self) -> str:
        pool = self.ints + self.lists + self.strs
        r = self.rng.random()
        if len(pool) >= 2 and r < 0.25:
            a, b = self.rng.sample(pool, 2)
            return f"print({a}, {b})"
        if self.ints and r < 0.4:
            return f"print({self.int_expr()})"
        return f"print({self.rng.choice(pool)})" if pool else f"print({self.int_expr()})"

    def program(self, statements: int) -> str:
        self.lines.append(self.simple("", True))
        for _ in range(statements - 1):
            self.lines.extend(self.statement())
        for _ in range(self.rng.choice((1, 1, 1, 2))):
            self.lines.append(self.printed())
        return "\n".join(self.lines) + "\n"


def write_program(rng: random.Random, min_statements: int = 3, max_statements: int = 8) -> str:
    """One random program's source (not yet executed; it may fail)."""
    return _Writer(rng).program(rng.randint(min_statements, max_statements))


def _acceptable(output: str) -> bool:
    lines = output.rstrip("\n").split("\n")
    return (0 < len(output) <= MAX_OUTPUT_CHARS and output.endswith("\n") and len(lines) <= MAX_OUTPUT_LINES
            and all(line.strip() and not line.startswith("#") for line in lines))


def _candidates(seed: int, held_out: bool) -> Iterator[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        source = write_program(rng)
        if source not in seen and is_held_out(source) == held_out:
            seen.add(source)
            yield source


def generate(n: int, seed: int, held_out: bool, timeout: float = 5.0,
             desc: str | None = None) -> list[Program]:
    """The first `n` programs of the seeded stream (held-out universe or training universe) that run cleanly
    and print an acceptable output, each with the output its execution printed."""
    stream = _candidates(seed, held_out)
    programs: list[Program] = []
    with tqdm(total=n, desc=desc, disable=desc is None) as bar:
        while len(programs) < n:
            # the few that fail or print something unsuitable are replaced in the next round; rounds are capped
            # so that the progress bar moves
            batch = [next(stream) for _ in range(min(256, max(8, int((n - len(programs)) * 1.2))))]
            for source, result in zip(batch, _run_patiently(batch, timeout), strict=True):
                if result.ok and _acceptable(result.stdout) and len(programs) < n:
                    programs.append(Program(source, result.stdout))
                    bar.update(1)
    return programs


def _run_patiently(sources: list[str], timeout: float) -> list[ExecResult]:
    """`run_many`, with the runs that hit the wall-clock limit run again with a 4x longer one: on a busy machine a
    correct program can miss it, and the program sets must not depend on the machine's load."""
    results = run_many(sources, timeout)
    late = [i for i, r in enumerate(results) if r.timed_out]
    for i, result in zip(late, run_many([sources[i] for i in late], 4 * timeout, workers=1), strict=True):
        results[i] = result
    return results


def held_out_set(n: int = 500, desc: str | None = None) -> list[Program]:
    """The held-out code-reasoning test set: always the same programs for the same `n`, and a prefix of the
    set for a larger `n`."""
    return generate(n, TEST_SEED, held_out=True, desc=desc)


def training_programs(n: int, seed: int = 0, desc: str | None = None) -> list[Program]:
    """Programs for the training mix; none can be in any `held_out_set`, whatever `n` and `seed`."""
    return generate(n, seed, held_out=False, desc=desc)


def save_programs(programs: Iterable[Program], path: str | Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for program in programs:
            f.write(json.dumps(asdict(program)) + "\n")


def load_programs(path: str | Path) -> list[Program]:
    with open(path, encoding="utf-8") as f:
        return [Program(**json.loads(line)) for line in f if line.strip()]
