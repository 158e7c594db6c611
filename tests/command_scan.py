"""Find the external commands that the project's code, templates, scripts and tests run.

Used by ``test_commands.py`` to hold ``cluster/commands.txt`` (every external command, with the
Debian package that provides it) true to the code. It reads source text and never runs anything:

- Python: the first element of an argv list literal (``["sbatch", "--parsable", ...]``) given to
  a call that runs a program, assigned to a name like ``argv``/``cmd``, or returned by a function
  whose name says it builds a command line; ``shutil.which("x")``; a program's absolute path
  (``"/usr/bin/chromium"``);
- shell (``cluster/*.sh``, the job templates, the Makefile's recipes): the first word of every
  simple command, also behind ``exec``, ``env``, ``sudo ... --``, ``nsenter``, ``$( ... )``;
- Apptainer definitions: the ``Bootstrap:`` agent's own program (``debootstrap``), which
  Apptainer runs on the host that builds the image.

It need not be perfect: it is a net for the usual ways a new command slips in, not a parser.
"""

from __future__ import annotations

import ast
import re
import shlex
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

COMMAND_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.+-]*$")
PROGRAM_PATH = re.compile(r"^/(?:usr/)?(?:local/)?s?bin/([A-Za-z][A-Za-z0-9_.+-]*)$")

# Calls whose first argument is an argv list.
RUNNER_CALLS = {"run", "Popen", "check_output", "check_call", "call", "subprocess_exec", "create_subprocess_exec",
                "_run", "run_as", "as_second_user", "_spawn_detached", "spawn", "execvp", "execv", "hk_run"}
ARGV_NAME = re.compile(r"(^|_)(argv|cmd|command|commands)$", re.IGNORECASE)
ARGV_FUNCTION = re.compile(r"(argv|command|cmd)($|_)", re.IGNORECASE)

SHELL_KEYWORDS = {
    "if", "then", "else", "elif", "fi", "for", "in", "do", "done", "while", "until", "case", "esac",
    "function", "select", "time", "!", "{", "}", "[[", "]]", "coproc",
}
SHELL_BUILTINS = {
    ".", ":", "[", "alias", "bg", "bind", "break", "builtin", "caller", "cd", "compgen", "complete",
    "continue", "declare", "dirs", "disown", "echo", "enable", "eval", "exit", "export", "false", "fc",
    "fg", "getopts", "hash", "help", "history", "jobs", "kill", "let", "local", "logout", "mapfile",
    "popd", "printf", "pushd", "pwd", "read", "readarray", "readonly", "return", "set", "shift",
    "shopt", "source", "test", "times", "exec", "command", "trap", "true", "type", "typeset", "ulimit", "umask", "unalias",
    "unset", "wait",
}
# Words after which the next word is a command again (their options skipped).
SHELL_WRAPPERS = {"exec", "command", "env", "nohup", "setsid", "nice", "ionice", "stdbuf", "timeout", "xargs",
                  "nsenter", "unshare", "chroot", "flock", "sudo", "runuser"}
# Wrappers whose command follows a "--" (their options take arguments, so nothing else is sure).
DASHDASH_WRAPPERS = {"sudo", "runuser", "flock"}
# Options of wrappers that take a separate argument (that argument is no command).
WRAPPER_OPTION_ARGS = {"env": {"-u", "-C", "-S"}, "unshare": {"--propagation", "--setgroups", "--map-user",
                       "--map-group"}, "nsenter": {"-t", "--target", "-S", "-G"}, "timeout": {"-s", "-k"},
                       "nice": {"-n"}, "ionice": {"-c", "-n"}, "stdbuf": {"-i", "-o", "-e"}}
SHELLS = {"sh", "bash", "dash"}
SEPARATORS = {";", "&&", "||", "|", "&", "(", ")", "|&", ";&", ";;&", "!"}

# Apptainer's bootstrap agents that run a program of the building host, and that program.
BOOTSTRAP_PROGRAMS = {"debootstrap": "debootstrap", "yum": "yum", "dnf": "dnf", "zypper": "zypper",
                      "arch": "pacstrap", "busybox": "busybox"}


@dataclass(frozen=True)
class Use:
    """One place that runs ``command``."""

    command: str
    where: str  # "path:line"


# --- Python ---------------------------------------------------------------------------------


def _argv_head(node: ast.AST) -> str | None:
    if isinstance(node, (ast.List, ast.Tuple)) and node.elts:
        first = node.elts[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str) and COMMAND_NAME.match(first.value):
            return first.value
    return None


def _call_name(func: ast.AST) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def python_commands(source: str, path: str) -> Iterator[Use]:
    tree = ast.parse(source, filename=path)
    functions: list[tuple[int, int, str]] = [
        (n.lineno, n.end_lineno or n.lineno, n.name)
        for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
    ]

    def in_argv_function(line: int) -> bool:
        return any(a <= line <= b and ARGV_FUNCTION.search(name) for a, b, name in functions)

    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            program = PROGRAM_PATH.match(node.value)
            if program:
                yield Use(program.group(1), f"{path}:{node.lineno}")
        elif isinstance(node, ast.Call):
            name = _call_name(node.func)
            if name == "which" and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str) and COMMAND_NAME.match(node.args[0].value):
                yield Use(node.args[0].value, f"{path}:{node.lineno}")
            if name in RUNNER_CALLS and node.args:
                head = _argv_head(node.args[0])
                if head:
                    yield Use(head, f"{path}:{node.lineno}")
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            head = _argv_head(node.value) if node.value is not None else None
            if head and any(isinstance(t, ast.Name) and ARGV_NAME.search(t.id) for t in targets):
                yield Use(head, f"{path}:{node.lineno}")
        elif isinstance(node, ast.Return) and node.value is not None:
            head = _argv_head(node.value)
            if head and in_argv_function(node.lineno):
                yield Use(head, f"{path}:{node.lineno}")


# --- shell ----------------------------------------------------------------------------------

_JINJA_COMMENT = re.compile(r"\{#.*?#\}", re.DOTALL)
_JINJA_STATEMENT = re.compile(r"\{%.*?%\}", re.DOTALL)
_JINJA_EXPRESSION = re.compile(r"\{\{.*?\}\}", re.DOTALL)
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_FUNCTION_DEF = re.compile(r"^\s*(?:function\s+)?([A-Za-z_][A-Za-z0-9_-]*)\s*\(\)\s*\{?", re.MULTILINE)
PLACEHOLDER = "JINJAVALUE"


def strip_jinja(text: str) -> str:
    text = _JINJA_COMMENT.sub("", text)
    text = _JINJA_STATEMENT.sub("", text)
    return _JINJA_EXPRESSION.sub(PLACEHOLDER, text)


def shell_functions(text: str) -> set[str]:
    return set(_FUNCTION_DEF.findall(text))


def _tokens(line: str) -> list[str] | None:
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|()<>")
    lexer.whitespace_split = True
    lexer.commenters = ""  # comments are gone already (_code_only): "#" also means ${#array[@]}
    try:
        return list(lexer)
    except ValueError:  # a quote that closes on a later line
        return None


def _code_only(text: str) -> list[str]:
    """The script's lines with comments and here-document bodies (data, not commands) blanked,
    so that an apostrophe in either cannot open a quote. Line numbers are kept."""
    out: list[str] = []
    quote = ""  # the open quote character, across lines
    heredoc_end: str | None = None
    for line in text.split("\n"):
        if heredoc_end is not None:
            if line.strip() == heredoc_end:
                heredoc_end = None
            out.append("")
            continue
        kept = []
        i = 0
        while i < len(line):
            c = line[i]
            if quote:
                if c == "\\" and quote == '"':
                    kept.append(line[i:i + 2])
                    i += 2
                    continue
                if c == quote:
                    quote = ""
            elif c in "'\"":
                quote = c
            elif c == "\\":
                kept.append(line[i:i + 2])
                i += 2
                continue
            elif c == "#" and (i == 0 or line[i - 1] in " \t;|&("):
                break
            elif line.startswith("<<", i) and not line.startswith("<<<", i):
                match = _HEREDOC.match(line, i)
                if match:
                    heredoc_end = match.group(2)
            kept.append(c)
            i += 1
        out.append("".join(kept))
    return out


def _logical_lines(text: str) -> Iterator[tuple[int, list[str]]]:
    """Each logical line's tokens: continuations and quotes that span lines joined."""
    lines = _code_only(text)
    i = 0
    while i < len(lines):
        start = i
        line = lines[i]
        i += 1
        tokens = _tokens(line)
        while (tokens is None or line.endswith("\\")) and i < len(lines):
            line = (line[:-1] + " " if line.endswith("\\") else line + "\n") + lines[i]
            i += 1
            tokens = _tokens(line)
        if tokens is None:
            return
        yield start + 1, tokens


def _substitutions(token: str) -> Iterator[str]:
    """The text of each ``$( ... )`` in a token (quotes keep them in one token)."""
    start = token.find("$(")
    while start != -1:
        depth, j = 0, start + 1
        while j < len(token):
            if token[j] == "(":
                depth += 1
            elif token[j] == ")":
                depth -= 1
                if depth == 0:
                    break
            j += 1
        inner = token[start + 2:j]
        if not inner.startswith("("):  # not $(( arithmetic ))
            yield inner
        start = token.find("$(", j)


_REDIRECTIONS = {"<", ">", ">>", "<<", "<<<", "&>", ">&", "<&", ">|", "<>"}
_COMMAND_AGAIN = SEPARATORS | {"then", "do", "else", "elif", "if", "while", "until", "{", "!", "time"}


class _ShellScanner:
    """The first word of each simple command, token by token. State carries across lines:
    ``case`` patterns, and array assignments or arithmetic that span lines."""

    def __init__(self, arrays: dict[str, str] | None = None) -> None:
        self.in_case_patterns = False
        self.case_word = False
        self.open_parens = 0  # inside VAR=( ... ) or (( ... )): what is still open
        # NAME=(first ...): an array run as a command line with "${NAME[@]}" runs its first word
        self.arrays = arrays if arrays is not None else {}
        self.array_name: str | None = None

    def commands(self, tokens: list[str]) -> Iterator[str]:
        at_command, wrapper, skip_next, previous = True, None, False, ""
        substitutions = 0  # open unquoted $( ... ): what follows its ")" continues a word
        shell_script = 0  # 1: after sh/bash, 2: after its -c (the next word is a script)
        for token in tokens:
            if shell_script == 2:
                yield from _ShellScanner(self.arrays).commands(_tokens(token) or [])
                shell_script = 0
                continue
            shell_script = 2 if shell_script == 1 and token == "-c" else 0
            for inner in _substitutions(token):
                yield from _ShellScanner(self.arrays).commands(_tokens(inner) or [])
            if self.open_parens:
                if self.array_name and token != ")":
                    self.arrays.setdefault(self.array_name, token)
                    self.array_name = None
                self.open_parens += token.count("(") - token.count(")")
                continue
            if token.startswith("((") or (token == "(" and previous.endswith("=")):
                self.open_parens = token.count("(") - token.count(")")
                self.array_name = previous.rstrip("+=") if token == "(" else None
                continue
            if token == "(" and previous.endswith("$"):
                substitutions += 1
                at_command, wrapper, previous = True, None, token
                continue
            if token == ")" and substitutions:
                substitutions -= 1
                at_command, wrapper, previous = False, None, token
                continue
            previous = token
            if self.in_case_patterns:
                if token == "esac":
                    self.in_case_patterns = False
                elif token == ")":
                    self.in_case_patterns, at_command = False, True
                continue
            if token in (";;", ";&", ";;&"):
                self.in_case_patterns, at_command = True, False
                continue
            if self.case_word:
                if token == "in":
                    self.case_word, self.in_case_patterns = False, True
                continue
            if token in _COMMAND_AGAIN:
                at_command, wrapper = True, None
                continue
            if token == "case" and at_command:
                at_command, self.case_word = False, True
                continue
            if token in _REDIRECTIONS or re.fullmatch(r"\d?[<>]&?", token):
                skip_next = True
                continue
            if skip_next:
                skip_next = False
                continue
            if not at_command:
                continue
            if wrapper is not None:
                if wrapper in DASHDASH_WRAPPERS:
                    if token == "--":
                        wrapper = "--"
                    continue
                if token in WRAPPER_OPTION_ARGS.get(wrapper, ()):
                    skip_next = True
                    continue
                if token.startswith("-") or "=" in token or token.replace(".", "").isdigit():
                    continue
            if re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=", token):  # VAR=value before a command
                continue
            array = re.fullmatch(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\[@\]\}", token)
            if array:  # "${NAME[@]}" run as a command: NAME's first word, then what follows it
                first = self.arrays.get(array.group(1), "")
                if COMMAND_NAME.match(first):
                    yield first
                if first in SHELL_WRAPPERS:
                    wrapper = first
                else:
                    at_command = False
                continue
            word = token.rsplit("/", 1)[-1] if token.startswith("/") else token
            at_command, wrapper = False, None
            if word in SHELL_WRAPPERS:
                if word not in SHELL_BUILTINS:
                    yield word
                at_command, wrapper = True, word
                continue
            if word in SHELL_KEYWORDS or word in SHELL_BUILTINS or "$" in word or "/" in word \
                    or PLACEHOLDER in word or not COMMAND_NAME.match(word):
                continue
            if word in SHELLS:
                shell_script = 1
            yield word


_ERB = re.compile(r"<%.*?%>", re.DOTALL)


def shell_commands(text: str, path: str, *, ignore: Iterable[str] = (),
                   arrays: dict[str, str] | None = None) -> Iterator[Use]:
    """``ignore``: the names of functions defined elsewhere (a sourced library); ``arrays``: the
    arrays such a library defines (NAME -> first word), filled by this scan too."""
    text = _ERB.sub(PLACEHOLDER, strip_jinja(text))
    ignored = set(ignore) | shell_functions(text)
    scanner = _ShellScanner(arrays)
    for number, tokens in _logical_lines(text):
        for command in scanner.commands(tokens):
            if command not in ignored:
                yield Use(command, f"{path}:{number}")


def makefile_commands(text: str, path: str) -> Iterator[Use]:
    """Commands in a Makefile's recipe lines (those starting with a tab)."""
    for number, line in enumerate(text.split("\n"), 1):
        if line.startswith("\t"):
            recipe = re.sub(r"\$\$", "$", re.sub(r"\$\(([A-Z_]+)\)", r"$\1", line.lstrip("\t@-")))
            for command in _ShellScanner().commands(_tokens(recipe) or []):
                yield Use(command, f"{path}:{number}")


# --- Apptainer definitions ------------------------------------------------------------------


def definition_commands(text: str, path: str) -> Iterator[Use]:
    """The host program behind each ``Bootstrap:`` agent a definition (template) can name.

    A template names its agents either literally or through a variable: every literal agent in
    it counts, as does every agent named in a Jinja comparison (``bootstrap == "debootstrap"``)."""
    for number, line in enumerate(text.split("\n"), 1):
        for agent in re.findall(r"^\s*Bootstrap:\s*([A-Za-z0-9_-]+)", line) + \
                re.findall(r"bootstrap\s*==\s*[\"']([A-Za-z0-9_-]+)[\"']", line):
            program = BOOTSTRAP_PROGRAMS.get(agent)
            if program:
                yield Use(program, f"{path}:{number}")
