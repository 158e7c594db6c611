"""Open OnDemand as the tests play it: its ERB rendering (by real Ruby, tests/ood/render.rb) and
its "basic" batch connect job script, whose helper functions are stood in for here because
OnDemand itself provides them (find_port, create_passwd, port_used, wait_until_port_used)."""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path
from typing import Any

import yaml

RENDER = Path(__file__).parent / "ood" / "render.rb"


class ErbError(Exception):
    """A template raised (as submit.yml.erb does for bad form input): OnDemand shows the message."""


def render_erb(template: Path, attributes: dict[str, str], locals: dict[str, Any] | None = None) -> str:
    proc = subprocess.run(["ruby", str(RENDER)], input=json.dumps(
        {"template": str(template), "attributes": attributes, "locals": locals or {}}),
        capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise ErbError(proc.stderr.strip())
    return proc.stdout


def submit_options(app: Path, form: dict[str, str]) -> dict[str, Any]:
    """submit.yml.erb rendered with the form's values, parsed as OnDemand parses it."""
    data = yaml.safe_load(render_erb(app / "submit.yml.erb", form))
    assert isinstance(data, dict)
    return data


# Stand-ins for the helpers OnDemand's basic template defines, in bash alone.
HELPERS = r"""
port_used () { local host="${1%:*}" port="${1##*:}"; (exec 3<>"/dev/tcp/${host}/${port}") 2>/dev/null; }
find_port () {
  local port
  while :; do
    port=$(shuf -i 20000-60000 -n 1)
    port_used "${1:-localhost}:${port}" || { echo "${port}"; return; }
  done
}
wait_until_port_used () {
  local i
  for ((i = 0; i < ${2:-30} * 2; i++)); do port_used "$1" && return 0; sleep 0.5; done
  return 1
}
create_passwd () { tr -cd '[:alnum:]' < /dev/urandom 2>/dev/null | head -c "${1:-32}"; }
"""


def stage_session(app: Path, form: dict[str, str], session_dir: Path) -> list[str]:
    """What OnDemand does when the form is submitted: render template/*.erb into the session's
    directory, keeping each file's mode (it copies the template directory with rsync -a), and
    write the job script (its basic template) there. Returns sbatch's arguments."""
    options = submit_options(app, form)
    assert options["batch_connect"]["template"] == "basic"
    session_dir.mkdir(parents=True)
    for erb in sorted((app / "template").glob("*.erb")):
        target = session_dir / erb.name.removesuffix(".erb")
        target.write_text(render_erb(erb, form))
        target.chmod(erb.stat().st_mode & 0o777)
    (session_dir / "job.sh").write_text(f"""#!/bin/bash
{HELPERS}
clean_up () {{
  [[ ${{SCRIPT_PID:-}} ]] && pkill -P "${{SCRIPT_PID}}" || :
  pkill -P $$
  exit "${{1:-0}}"
}}
cd {shlex.quote(str(session_dir))}
export host port
host=$(hostname)
[[ -e before.sh ]] && source before.sh
./script.sh &
SCRIPT_PID=$!
[[ -e after.sh ]] && source after.sh
(umask 077; printf 'host: %s\\nport: %s\\npassword: %s\\n' "$host" "$port" "$password" > connection.yml)
wait "${{SCRIPT_PID}}" || clean_up 1
clean_up
""")
    script = options["script"]
    return ["-J", script.get("job_name", "ood"), "-o", str(session_dir / "output.log"), "-D", str(session_dir),
            *script.get("native", []), str(session_dir / "job.sh")]
