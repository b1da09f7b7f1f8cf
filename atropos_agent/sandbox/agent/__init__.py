"""The slot agent: the one long-lived process inside a slot.

The sandbox server starts one agent per slot, inside that slot's bubblewrap namespaces, and
talks to it over the agent's stdin/stdout with length-prefixed JSON frames. Keeping this process
alive is what makes a call cheap: isolation is set up once per slot, and a tool call costs one
``posix_spawn`` of the shell instead of a fresh sandbox.

The package runs under the *sandbox's* python3 (``python -I -S``, not the server's interpreter
or virtualenv), so it uses the standard library only. The server copies it into the slot's
read-only runtime directory (``sandbox/runtime.py``) and imports two of its modules itself: the
frame format (``framing``) and the one failure shape (``results``).

Modules, one idea each:

- ``framing``: frames on the pipe and the operation names;
- ``config``: what the server tells an agent at start, and the limits the agent takes on;
- ``output``: a command's output, stdout and stderr apart or merged, head and tail kept;
- ``results``: the failure shape, and a command's result read from how it ended;
- ``workspace``: the path jail, disk use, bounded reads and writes;
- ``processes``: spawning, supervising and killing commands, reaping orphans;
- ``shell``: the stateful shell;
- ``jobs``, ``job_output``: background jobs and their bounded output (on first use);
- ``repl``, ``repl_driver``: the stateful Python interpreter, and the program it runs (on first
  use);
- ``tmux``, ``tmux_keys``, ``recording``: the tmux session, its keys, its recording (on first use);
- ``tools``: the tools a call can name;
- ``artifacts``: reading, listing and archiving workspace files;
- ``main``: the request loop.

Nothing is imported here: every slot carries an agent, and the server imports only what it uses.
"""
