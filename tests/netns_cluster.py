"""A three-node SLURM cluster on this machine, each node its own network namespace.

Node X is the namespace `<tag>-X` with its own address 10.213.K.1X (a veth pair into a bridge in
the root namespace, which holds 10.213.K.1), its own hostname `nodeX` (a UTS namespace) and its
own `slurmd -N nodeX` with its own spool; one slurmctld (root namespace, on the bridge address)
and one munged serve them all; the filesystem is shared, as a cluster's shared filesystem is.
Names resolve through the cluster's own hosts file, bind-mounted over /etc/hosts in each node's
mount namespace (the cluster's DNS). Everything is created with names carrying this process's id
and removed by pid and by name in `stop()`; only addresses inside 10.213.K.0/24 are contacted.

Faults: `kill_node` is a power loss (the cable cut, then every process in the node's namespace,
its slurmd included, stopped and killed), `start_node` boots it (cable in, slurmd started),
`link(node, up=False)` cuts only its cable (the root-side veth).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from slurm_cluster import SlurmQueries, _free_port, _wait, common_conf, start_munge

NODES = ("a", "b", "c")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_unavailable() -> str | None:
    """None when network namespaces can be made here, else why not (the fixture then fails with it)."""
    if shutil.which("ip") is None:
        return "the `ip` tool (iproute2) is missing"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN); run the multi-node tests as root"
    probe = f"rdprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace (CAP_NET_ADMIN?): {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def _free_subnet() -> int:
    used = _ip("-4", "addr").stdout
    for k in range(10, 250):
        if f" 10.213.{k}." not in used:
            return k
    raise RuntimeError("no free 10.213.K.0/24 test subnet")


class NetnsCluster(SlurmQueries):
    def __init__(self, root: Path, cpus_per_node: int = 2, slurmd_timeout: int = 10):
        os.chmod(root, 0o755)  # munged (user munge) must reach its socket directory
        self.root = root
        self.tag = f"rd{os.getpid() % 100000}"
        self.k = _free_subnet()
        self.bridge = f"{self.tag}br"
        self.bridge_ip = f"10.213.{self.k}.1"
        self.nodes = {n: {"name": f"node{n}", "ns": f"{self.tag}-{n}", "veth": f"{self.tag}{n}h", "peer": f"{self.tag}{n}n",
                          "ip": f"10.213.{self.k}.{11 + i}"} for i, n in enumerate(NODES)}
        self.slurmd: dict[str, subprocess.Popen] = {}
        self.pids: list[int] = []
        self.dirs = {d: root / d for d in ("state", "spool", "log", "munge", "run")}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        self.conf = root / "slurm.conf"
        self.hosts = root / "hosts"  # the cluster's DNS: bind-mounted over /etc/hosts on every node
        self.socket = self.dirs["munge"] / "munge.socket"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf), MUNGE_SOCKET=str(self.socket))
        node_lines = "\n".join(f"NodeName={v['name']} NodeHostname={v['name']} NodeAddr={v['ip']} CPUs={cpus_per_node} State=UNKNOWN"
                               for v in self.nodes.values())
        names = ",".join(v["name"] for v in self.nodes.values())
        # SlurmdTimeout: a node that stops answering is DOWN after this many seconds, and its jobs
        # end NODE_FAIL and are requeued (--requeue, JobRequeue=1); ReturnToService=2 lets a
        # restarted slurmd put its node back in service. The slurmd port is the same on every
        # node: each namespace has its own network stack.
        self.conf.write_text(f"""ClusterName=recipemn
SlurmctldHost={socket.gethostname()}({self.bridge_ip})
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
{common_conf(self.dirs, self.socket, slurmd_suffix="%n")}SlurmdTimeout={slurmd_timeout}
MessageTimeout=5
{node_lines}
PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
""")

    # ------------------------------------------------------------------ network
    def _network_up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        self.hosts.write_text("127.0.0.1 localhost\n" + "".join(f"{v['ip']} {v['name']}\n" for v in self.nodes.values()))
        for v in self.nodes.values():
            _ip("netns", "add", v["ns"])
            _ip("link", "add", v["veth"], "type", "veth", "peer", "name", v["peer"])
            _ip("link", "set", v["peer"], "netns", v["ns"])
            _ip("link", "set", v["veth"], "master", self.bridge, "up")
            _ip("-n", v["ns"], "addr", "add", f"{v['ip']}/24", "dev", v["peer"])
            _ip("-n", v["ns"], "link", "set", v["peer"], "up")
            _ip("-n", v["ns"], "link", "set", "lo", "up")

    def _network_down(self) -> None:
        for v in self.nodes.values():
            _ip("netns", "del", v["ns"], check=False)  # takes its veth end, and so the pair, with it
            _ip("link", "del", v["veth"], check=False)
        _ip("link", "del", self.bridge, check=False)

    # ------------------------------------------------------------------ daemons
    def start(self) -> "NetnsCluster":
        try:
            self._network_up()
            self.pids.append(start_munge(self.dirs["munge"], self.socket, self.env))
            subprocess.run(["/usr/sbin/slurmctld", "-f", str(self.conf)], check=True, env=self.env)
            pidfile = self.dirs["run"] / "slurmctld.pid"
            _wait(lambda: pidfile.is_file() and pidfile.read_text().strip(), 20, "slurmctld")
            self.pids.append(int(pidfile.read_text()))
            for n in self.nodes:
                self.start_node(n)
            self.wait_idle(*self.nodes)
        except BaseException:
            self.stop()
            raise
        return self

    def start_node(self, node: str) -> None:
        """slurmd -N nodeX inside the node's namespace, with the node's own hostname (UTS namespace),
        its cable plugged in."""
        v = self.nodes[node]
        self.link(node, up=True)
        # nsenter, not `ip netns exec`, which remounts /sys and so hides the cgroup tree slurmd
        # needs; the node's own hosts file is bind-mounted in a mount namespace of its own.
        (self.dirs["spool"] / v["name"]).mkdir(exist_ok=True)
        cmd = ["nsenter", f"--net=/run/netns/{v['ns']}", "unshare", "--uts", "--mount", "sh", "-c",
               f"hostname {v['name']} && mount --bind {self.hosts} /etc/hosts && "
               f"exec /usr/sbin/slurmd -D -N {v['name']} -f {self.conf}"]
        log = open(self.dirs["log"] / f"slurmd-{v['name']}.stdout", "ab")
        self.slurmd[node] = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()

    def node_pids(self, node: str) -> list[int]:
        out = _ip("netns", "pids", self.nodes[node]["ns"], check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, node: str) -> None:
        """The node loses power: its cable goes dead and every process in its namespace (slurmd,
        slurmstepd, srun, the ranks) stops at once; `start_node` boots it again.

        SIGKILLs sent one pid after another are not that: a process still alive between two of
        them can act on what it sees, and one on this node asked slurmctld to kill the job step
        on every node (node B's slurmd logged "Sent signal 9 to StepId=3.0" with the survivor
        still in its error handling, and slurmctld could not answer the asker on node A). So the
        cable is cut first (nothing the node does reaches anyone, as when it loses power), then
        every process is stopped (SIGSTOP: nothing has died yet, so nothing reacts), then killed.
        The survivors see silence, not a refused connection, as after a real power loss."""
        self.link(node, up=False)
        for _ in range(5):  # a process may fork while we stop them
            pids = self.node_pids(node)
            if not pids:
                break
            for sig in (signal.SIGSTOP, signal.SIGKILL):
                for pid in pids:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
            time.sleep(0.2)
        if node in self.slurmd:
            self.slurmd.pop(node).wait(10)

    def kill_daemons(self, node: str) -> None:
        """SLURM's daemons on the node crash (slurmd and every slurmstepd, SIGKILL), while the node,
        its network and whatever else runs there (srun, the batch script) stay up."""
        for pid in self.node_pids(node):
            try:
                name = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            if name in ("slurmd", "slurmstepd"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if node in self.slurmd:
            self.slurmd.pop(node).wait(10)

    def link(self, node: str, up: bool) -> None:
        """Plug or unplug the node's cable: its veth in the root namespace, up or down."""
        _ip("link", "set", self.nodes[node]["veth"], "up" if up else "down")

    # ------------------------------------------------------------------ queries
    def node_state(self, node: str) -> str:
        return self.run(["sinfo", "-h", "-N", "-n", self.nodes[node]["name"], "-o", "%T"]).stdout.strip()

    def wait_idle(self, *nodes: str, timeout: float = 60) -> None:
        _wait(lambda: all(self.node_state(n) == "idle" for n in nodes), timeout, f"nodes {', '.join(nodes)} to become idle")

    # ------------------------------------------------------------------ teardown
    def stop(self) -> None:
        """Every process this cluster started, by namespace and by pid, then every name it made."""
        for node in self.nodes:
            self.kill_node(node)
        for pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        for pid in self.pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._network_down()
