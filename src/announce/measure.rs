//! Sampling CPU, memory and tasks from one of three sources:
//! - the app's process tree (announce's descendants, read from `/proc/<pid>/stat`), when
//!   announce runs the app;
//! - the container's cgroup v2 (`cpu.stat`, `memory.current`, `memory.stat`, `pids.current`),
//!   when `/sys/fs/cgroup` is a container's own cgroup;
//! - the whole machine (`/proc/stat`, `/proc/meminfo`, `/proc/loadavg`) otherwise.
//!
//! The limits the shares are taken of come from the cgroup v2 the process is in and its
//! ancestors (`cpu.max`, `memory.max`, `pids.max`), else from the machine.
//! The parsers take text, so they are tested on fixtures.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// One measurement over the last interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// CPU used, in % of the CPUs available (0–100).
    pub cpu: f64,
    /// Memory in use, in % of the memory limit (0–100).
    pub mem: f64,
    /// Tasks: processes and their threads, the unit of the cgroup's `pids.current`.
    pub procs: u64,
    /// The task limit (`pids.max`), if one is set.
    pub procs_limit: Option<u64>,
}

/// Where the kernel's files are; tests point these at fixtures.
#[derive(Debug, Clone)]
pub struct Roots {
    /// procfs, normally `/proc`.
    pub proc: PathBuf,
    /// The cgroup v2 mount, normally `/sys/fs/cgroup`.
    pub cgroup: PathBuf,
}

impl Default for Roots {
    fn default() -> Self {
        Roots {
            proc: PathBuf::from("/proc"),
            cgroup: PathBuf::from("/sys/fs/cgroup"),
        }
    }
}

/// What is measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// The descendants of this process (announce itself, which runs the app).
    Tree(i32),
    /// A cgroup v2 directory (a container's).
    Cgroup(PathBuf),
    /// The whole machine.
    Host,
}

impl Source {
    /// The source for a run: the process tree under `tree_root` when announce runs the app;
    /// else the container's cgroup when the cgroup mount is one (a non-root cgroup has
    /// `memory.current`, the machine's root cgroup has not); else the machine.
    pub fn detect(roots: &Roots, tree_root: Option<i32>) -> Source {
        if let Some(pid) = tree_root {
            return Source::Tree(pid);
        }
        if roots.cgroup.join("cgroup.controllers").is_file()
            && roots.cgroup.join("memory.current").is_file()
        {
            return Source::Cgroup(roots.cgroup.clone());
        }
        Source::Host
    }
}

/// Cumulative counters from one scan.
#[derive(Debug, Clone)]
enum Counters {
    /// Per process of the tree (the root included): its stat line.
    Tree(HashMap<i32, ProcStat>),
    /// `usage_usec` from `cpu.stat`.
    Cgroup(u64),
    /// The machine's busy and total CPU ticks.
    Host(CpuTicks),
}

/// Takes readings from a [`Source`]; the first call only sets the baseline.
#[derive(Debug)]
pub struct Sampler {
    source: Source,
    roots: Roots,
    /// The cgroup v2 directories whose limits apply, innermost first.
    limit_dirs: Vec<PathBuf>,
    last: Option<(Instant, Counters)>,
    ticks_per_sec: f64,
    page_size: u64,
}

impl Sampler {
    /// A sampler of `source`, with limits from the cgroup of this process, if any.
    pub fn new(source: Source, roots: Roots) -> Sampler {
        let own = std::fs::read_to_string(roots.proc.join("self/cgroup")).unwrap_or_default();
        let limit_dirs = match &source {
            Source::Cgroup(dir) => vec![dir.clone()],
            _ => cgroup_chain(&roots.cgroup, &own),
        };
        Sampler {
            source,
            roots,
            limit_dirs,
            last: None,
            ticks_per_sec: rustix::param::clock_ticks_per_second().max(1) as f64,
            page_size: rustix::param::page_size() as u64,
        }
    }

    /// Reads the counters at `now`; a reading over the time since the previous call, none
    /// on the first call (or when the clock did not move).
    pub fn sample(&mut self, now: Instant) -> io::Result<Option<Reading>> {
        let limits = self.limits();
        let (counters, mem_used, procs) = match &self.source {
            Source::Tree(root) => {
                let procs = scan_tree(&self.roots.proc, *root)?;
                let rss: u64 = procs
                    .values()
                    .filter(|p| p.pid != *root)
                    .map(|p| p.rss_pages)
                    .sum();
                let tasks = procs
                    .values()
                    .filter(|p| p.pid != *root)
                    .map(|p| p.threads)
                    .sum();
                (Counters::Tree(procs), rss * self.page_size, tasks)
            }
            Source::Cgroup(dir) => {
                let usage = parse_usage_usec(&read(&dir.join("cpu.stat"))?)
                    .ok_or_else(|| bad(dir, "cpu.stat has no usage_usec"))?;
                let current = parse_u64(&read(&dir.join("memory.current"))?)
                    .ok_or_else(|| bad(dir, "memory.current is not a number"))?;
                let inactive = std::fs::read_to_string(dir.join("memory.stat"))
                    .ok()
                    .and_then(|t| parse_key(&t, "inactive_file"))
                    .unwrap_or(0);
                let tasks = std::fs::read_to_string(dir.join("pids.current"))
                    .ok()
                    .and_then(|t| parse_u64(&t))
                    .unwrap_or(0);
                // The working set, as `docker stats` shows it: reclaimable file cache out.
                (
                    Counters::Cgroup(usage),
                    current.saturating_sub(inactive),
                    tasks,
                )
            }
            Source::Host => {
                let proc = &self.roots.proc;
                let ticks = parse_proc_stat(&read(&proc.join("stat"))?)
                    .ok_or_else(|| bad(proc, "stat has no cpu line"))?;
                let (total, available) = parse_meminfo(&read(&proc.join("meminfo"))?)
                    .ok_or_else(|| bad(proc, "meminfo lacks MemTotal or MemAvailable"))?;
                let tasks = parse_loadavg_tasks(&read(&proc.join("loadavg"))?).unwrap_or(0);
                (
                    Counters::Host(ticks),
                    total.saturating_sub(available),
                    tasks,
                )
            }
        };
        let reading = match &self.last {
            Some((then, before)) => {
                let secs = now.saturating_duration_since(*then).as_secs_f64();
                self.cpu(before, &counters, secs, limits.cpus)
                    .map(|cpu| Reading {
                        cpu,
                        mem: share(mem_used as f64, limits.mem as f64),
                        procs,
                        procs_limit: limits.pids,
                    })
            }
            None => None,
        };
        self.last = Some((now, counters));
        Ok(reading)
    }

    /// CPU used between two scans `secs` apart, in % of `cpus`; none if no time passed.
    fn cpu(&self, before: &Counters, after: &Counters, secs: f64, cpus: f64) -> Option<f64> {
        if secs <= 0.0 {
            return None;
        }
        match (before, after) {
            (Counters::Tree(a), Counters::Tree(b)) => {
                let Source::Tree(root) = self.source else {
                    return None;
                };
                let used = tree_ticks(root, a, b) as f64 / self.ticks_per_sec;
                Some(share(used, secs * cpus))
            }
            (Counters::Cgroup(a), Counters::Cgroup(b)) => {
                Some(share(b.saturating_sub(*a) as f64 / 1e6, secs * cpus))
            }
            // The machine's own tick counts already cover all its CPUs.
            (Counters::Host(a), Counters::Host(b)) => Some(share(
                b.busy.saturating_sub(a.busy) as f64,
                b.total.saturating_sub(a.total) as f64,
            )),
            _ => None,
        }
    }

    /// The limits now: the tightest of the cgroup chain, else the machine's.
    fn limits(&self) -> Limits {
        let mut cpus: Option<f64> = None;
        let mut mem: Option<u64> = None;
        let mut pids: Option<u64> = None;
        for dir in &self.limit_dirs {
            let file = |name: &str| std::fs::read_to_string(dir.join(name)).ok();
            if let Some(q) = file("cpu.max").as_deref().and_then(parse_cpu_max) {
                cpus = Some(cpus.map_or(q, |c| c.min(q)));
            }
            if let Some(m) = file("memory.max").as_deref().and_then(parse_max) {
                mem = Some(mem.map_or(m, |c| c.min(m)));
            }
            if let Some(p) = file("pids.max").as_deref().and_then(parse_max) {
                pids = Some(pids.map_or(p, |c| c.min(p)));
            }
        }
        let cpus = cpus.unwrap_or_else(|| {
            std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
        });
        let mem = mem.or_else(|| {
            std::fs::read_to_string(self.roots.proc.join("meminfo"))
                .ok()
                .and_then(|t| parse_meminfo(&t))
                .map(|(total, _)| total)
        });
        Limits {
            cpus,
            mem: mem.unwrap_or(0),
            pids,
        }
    }
}

/// What shares are taken of.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// CPUs available (a quota may be fractional).
    cpus: f64,
    /// Bytes; 0 when unknown.
    mem: u64,
    /// Tasks, when limited.
    pids: Option<u64>,
}

/// `100 × part / whole`, clamped to 0–100; 0 when `whole` is not positive.
fn share(part: f64, whole: f64) -> f64 {
    if whole > 0.0 {
        (100.0 * part / whole).clamp(0.0, 100.0)
    } else {
        0.0
    }
}

fn read(path: &Path) -> io::Result<String> {
    std::fs::read_to_string(path)
}

fn bad(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}", path.display()),
    )
}

/// The cgroup v2 directories of this process, innermost first up to the mount, from
/// `/proc/self/cgroup` text (`0::/path`). Empty without a v2 hierarchy. Inside a cgroup
/// namespace the path is `/`, which is the mount itself.
fn cgroup_chain(mount: &Path, self_cgroup: &str) -> Vec<PathBuf> {
    if !mount.join("cgroup.controllers").is_file() {
        return Vec::new();
    }
    let Some(rel) = self_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(|p| p.trim().trim_start_matches('/'))
    else {
        return Vec::new();
    };
    let mut dir = mount.join(rel);
    if !dir.is_dir() {
        dir = mount.to_path_buf();
    }
    let mut chain = Vec::new();
    loop {
        chain.push(dir.clone());
        if dir == mount || !dir.pop() || !dir.starts_with(mount) {
            break;
        }
    }
    chain
}

/// The fields of `/proc/<pid>/stat` that sampling uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Process ID.
    pub pid: i32,
    /// Parent process ID.
    pub ppid: i32,
    /// Start time in ticks after boot: a reused pid has another.
    pub start: u64,
    /// utime + stime, in clock ticks.
    pub ticks: u64,
    /// cutime + cstime: the time of its children it has waited for.
    pub reaped: u64,
    /// Threads.
    pub threads: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

/// Parses one `/proc/<pid>/stat` line. The command name is in parentheses and may hold
/// spaces and parentheses itself, so fields are counted from the last `)`.
pub fn parse_pid_stat(text: &str) -> Option<ProcStat> {
    let (head, rest) = text.rsplit_once(')')?;
    let pid = head.split_once('(')?.0.trim().parse().ok()?;
    // rest starts at field 3 (state): index i here is field i + 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    Some(ProcStat {
        pid,
        ppid: f.get(1)?.parse().ok()?,
        ticks: num(14)? + num(15)?,
        reaped: num(16)? + num(17)?,
        threads: num(20)?,
        start: num(22)?,
        rss_pages: num(24)?,
    })
}

/// Every process under `proc`, then `root` and its descendants.
fn scan_tree(proc: &Path, root: i32) -> io::Result<HashMap<i32, ProcStat>> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(proc)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may end between the listing and the read: skip it.
        if let Some(p) = std::fs::read_to_string(entry.path().join("stat"))
            .ok()
            .and_then(|t| parse_pid_stat(&t))
        {
            all.push(p);
        }
    }
    Ok(descendants(root, &all))
}

/// `root` and all its descendants among `all`.
pub fn descendants(root: i32, all: &[ProcStat]) -> HashMap<i32, ProcStat> {
    let mut children: HashMap<i32, Vec<&ProcStat>> = HashMap::new();
    for p in all {
        children.entry(p.ppid).or_default().push(p);
    }
    let mut tree = HashMap::new();
    let mut todo = vec![root];
    if let Some(r) = all.iter().find(|p| p.pid == root) {
        tree.insert(root, *r);
    }
    while let Some(pid) = todo.pop() {
        for c in children.get(&pid).into_iter().flatten() {
            if c.pid != root && tree.insert(c.pid, **c).is_none() {
                todo.push(c.pid);
            }
        }
    }
    tree
}

/// CPU ticks the tree under `root` used between two scans (`before`, `after`: the root and
/// its descendants). A process counts its own time (the root's own time does not: that is
/// announce). A process that ended between the scans shows in its parent's `reaped` time
/// once waited for: that growth counts, less what was already counted for the children that
/// ended, so short-lived processes count and none counts twice.
pub fn tree_ticks(
    root: i32,
    before: &HashMap<i32, ProcStat>,
    after: &HashMap<i32, ProcStat>,
) -> u64 {
    let same = |p: &ProcStat| before.get(&p.pid).filter(|q| q.start == p.start);
    let mut ended: HashMap<i32, u64> = HashMap::new();
    for q in before.values() {
        if after.get(&q.pid).is_none_or(|p| p.start != q.start) {
            *ended.entry(q.ppid).or_default() += q.ticks + q.reaped;
        }
    }
    let mut ticks = 0;
    for p in after.values() {
        let (own, reaped) = match same(p) {
            Some(q) => (
                p.ticks.saturating_sub(q.ticks),
                p.reaped.saturating_sub(q.reaped),
            ),
            None => (p.ticks, p.reaped),
        };
        if p.pid != root {
            ticks += own;
        }
        let counted = if same(p).is_some() {
            ended.get(&p.pid).copied().unwrap_or(0)
        } else {
            0
        };
        ticks += reaped.saturating_sub(counted);
    }
    ticks
}

/// The machine's CPU ticks from `/proc/stat`'s `cpu` line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTicks {
    /// user + nice + system + irq + softirq + steal (guest time is inside user).
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

/// Parses the aggregate `cpu` line of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<CpuTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    Some(CpuTicks {
        busy,
        total: busy + at(3) + at(4),
    })
}

/// `(MemTotal, MemAvailable)` in bytes from `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .map(|k| k * 1024)
    };
    Some((kib("MemTotal")?, kib("MemAvailable")?))
}

/// The task count from `/proc/loadavg` (`0.20 0.18 0.12 1/80 11206`: 80).
pub fn parse_loadavg_tasks(text: &str) -> Option<u64> {
    text.split_whitespace()
        .nth(3)?
        .split_once('/')?
        .1
        .parse()
        .ok()
}

/// `usage_usec` from a cgroup's `cpu.stat`.
pub fn parse_usage_usec(text: &str) -> Option<u64> {
    parse_key(text, "usage_usec")
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines).
fn parse_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// CPUs from `cpu.max` (`quota period`); `None` for `max` (no quota).
pub fn parse_cpu_max(text: &str) -> Option<f64> {
    let mut it = text.split_whitespace();
    let quota: f64 = it.next()?.parse().ok()?;
    let period: f64 = it.next().unwrap_or("100000").parse().ok()?;
    (quota > 0.0 && period > 0.0).then_some(quota / period)
}

/// A number from a single-value cgroup file; `None` for `max` (no limit).
pub fn parse_max(text: &str) -> Option<u64> {
    parse_u64(text)
}

fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn parses_pid_stat_with_odd_command_names() {
        let line = "4242 (my (app) x) S 4200 4242 4200 0 -1 4194560 500 0 0 0 \
                    150 50 7 3 20 0 4 0 123456 104857600 2560 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let p = parse_pid_stat(line).unwrap();
        assert_eq!(
            p,
            ProcStat {
                pid: 4242,
                ppid: 4200,
                start: 123456,
                ticks: 200,
                reaped: 10,
                threads: 4,
                rss_pages: 2560,
            }
        );
        assert_eq!(parse_pid_stat("12 (x) S 1 2"), None);
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    fn proc(pid: i32, ppid: i32, ticks: u64, reaped: u64) -> ProcStat {
        ProcStat {
            pid,
            ppid,
            start: pid as u64,
            ticks,
            reaped,
            threads: 1,
            rss_pages: 1,
        }
    }

    fn map(ps: &[ProcStat]) -> HashMap<i32, ProcStat> {
        ps.iter().map(|p| (p.pid, *p)).collect()
    }

    #[test]
    fn finds_descendants_only() {
        let all = [
            proc(1, 0, 0, 0),
            proc(10, 1, 0, 0),
            proc(11, 10, 0, 0),
            proc(12, 11, 0, 0),
            proc(20, 1, 0, 0),
            proc(21, 20, 0, 0),
        ];
        let mut t: Vec<i32> = descendants(10, &all).into_keys().collect();
        t.sort();
        assert_eq!(t, [10, 11, 12]);
        assert!(descendants(99, &all).is_empty());
    }

    #[test]
    fn tree_ticks_count_own_time_and_reaped_children_once() {
        // 10 is announce (the root), 11 the app, 12 a worker of the app.
        let before = map(&[
            proc(10, 1, 500, 0),
            proc(11, 10, 100, 0),
            proc(12, 11, 40, 0),
        ]);
        // The app used 30; the worker used 20 more, ended and was waited for (60 reaped, 40
        // of them counted before); a child of the app that lived between the scans added 5
        // to the reaped time. The root's own time is announce's and does not count.
        let after = map(&[proc(10, 1, 900, 0), proc(11, 10, 130, 65)]);
        assert_eq!(tree_ticks(10, &before, &after), 30 + (65 - 40));
        // A process that appears counts all its time; one whose pid was reused too.
        let mut reused = proc(12, 11, 7, 0);
        reused.start = 999;
        let after = map(&[proc(10, 1, 500, 0), proc(11, 10, 100, 0), reused]);
        // The old 12 ended without being waited for yet: nothing of it shows.
        assert_eq!(tree_ticks(10, &before, &after), 7);
        // The root waiting for the app (its exit) counts what was not counted yet.
        let after = map(&[proc(10, 1, 500, 150)]);
        assert_eq!(tree_ticks(10, &before, &after), 150 - 100);
    }

    #[test]
    fn parses_proc_files() {
        let stat = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\nintr 1\n";
        assert_eq!(
            parse_proc_stat(stat),
            Some(CpuTicks {
                busy: 161,
                total: 1181
            })
        );
        let meminfo = "MemTotal:       16303456 kB\nMemFree:         1000000 kB\n\
                       MemAvailable:    8151728 kB\n";
        assert_eq!(
            parse_meminfo(meminfo),
            Some((16303456 * 1024, 8151728 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
        assert_eq!(parse_loadavg_tasks("0.20 0.18 0.12 1/80 11206\n"), Some(80));
        assert_eq!(parse_loadavg_tasks("0.20"), None);
    }

    #[test]
    fn parses_cgroup_files() {
        let cpu_stat = "usage_usec 8754321\nuser_usec 6000000\nsystem_usec 2754321\n";
        assert_eq!(parse_usage_usec(cpu_stat), Some(8754321));
        assert_eq!(parse_usage_usec("user_usec 1\n"), None);
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_max("536870912\n"), Some(536870912));
        assert_eq!(parse_max("max\n"), None);
        assert_eq!(
            parse_key(
                "anon 10\ninactive_file 4096\nactive_file 1\n",
                "inactive_file"
            ),
            Some(4096)
        );
    }

    /// A temporary directory for fixture files, removed on drop.
    struct Fixture(PathBuf);

    impl Fixture {
        fn new(name: &str) -> Fixture {
            let dir = std::env::temp_dir().join(format!(
                "cr-announce-{}-{name}-{}",
                std::process::id(),
                fastrand::u32(..)
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Fixture(dir)
        }

        fn write(&self, rel: &str, text: &str) {
            let p = self.0.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// The reading over one second in which `change` happened to the files.
    fn reading_across(source: Source, roots: Roots, change: impl FnOnce()) -> Reading {
        let mut s = Sampler::new(source, roots);
        let t0 = Instant::now();
        assert_eq!(s.sample(t0).unwrap(), None);
        change();
        s.sample(t0 + Duration::from_secs(1)).unwrap().unwrap()
    }

    #[test]
    fn cgroup_source_reads_usage_against_the_quota() {
        let f = Fixture::new("cg");
        let cg = f.0.join("cgroup");
        f.write("cgroup/cgroup.controllers", "cpu memory pids\n");
        f.write("cgroup/cpu.max", "50000 100000\n");
        f.write("cgroup/memory.max", "1000000\n");
        f.write("cgroup/memory.current", "600000\n");
        f.write("cgroup/memory.stat", "anon 1\ninactive_file 100000\n");
        f.write("cgroup/pids.current", "12\n");
        f.write("cgroup/pids.max", "max\n");
        f.write("cgroup/cpu.stat", "usage_usec 1000000\n");
        let roots = Roots {
            proc: f.0.join("proc"),
            cgroup: cg.clone(),
        };
        let source = Source::detect(&roots, None);
        assert_eq!(source, Source::Cgroup(cg));
        // 0.25 s of CPU in 1 s, against a quota of half a CPU: 50 %.
        let r = reading_across(source, roots, || {
            f.write("cgroup/cpu.stat", "usage_usec 1250000\n")
        });
        assert!((r.cpu - 50.0).abs() < 1e-9, "{r:?}");
        assert!((r.mem - 50.0).abs() < 1e-9, "{r:?}");
        assert_eq!((r.procs, r.procs_limit), (12, None));
    }

    #[test]
    fn host_source_reads_proc() {
        let f = Fixture::new("host");
        let roots = Roots {
            proc: f.0.join("proc"),
            cgroup: f.0.join("no-cgroup"),
        };
        f.write("proc/stat", "cpu  100 0 100 800 0 0 0 0 0 0\n");
        f.write("proc/meminfo", "MemTotal: 1000 kB\nMemAvailable: 750 kB\n");
        f.write("proc/loadavg", "0.5 0.4 0.3 2/321 999\n");
        let source = Source::detect(&roots, None);
        assert_eq!(source, Source::Host);
        // 300 of 400 ticks busy.
        let r = reading_across(source, roots, || {
            f.write("proc/stat", "cpu  300 0 200 900 0 0 0 0 0 0\n")
        });
        assert!((r.cpu - 75.0).abs() < 1e-9, "{r:?}");
        assert!((r.mem - 25.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.procs, 321);
    }

    #[test]
    fn limits_come_from_the_tightest_cgroup_in_the_chain() {
        let f = Fixture::new("chain");
        f.write("cg/cgroup.controllers", "cpu memory pids\n");
        f.write("cg/app.slice/cpu.max", "max 100000\n");
        f.write("cg/app.slice/memory.max", "4000\n");
        f.write("cg/app.slice/x.service/cpu.max", "200000 100000\n");
        f.write("cg/app.slice/x.service/memory.max", "max\n");
        f.write("cg/app.slice/x.service/pids.max", "64\n");
        let mount = f.0.join("cg");
        let chain = cgroup_chain(&mount, "0::/app.slice/x.service\n");
        assert_eq!(
            chain,
            [
                mount.join("app.slice/x.service"),
                mount.join("app.slice"),
                mount.clone()
            ]
        );
        // Inside a cgroup namespace: the mount itself.
        assert_eq!(cgroup_chain(&mount, "0::/\n"), std::slice::from_ref(&mount));
        // cgroup v1 only: nothing.
        assert!(cgroup_chain(&f.0, "0::/\n").is_empty());
        let s = Sampler {
            source: Source::Host,
            roots: Roots {
                proc: f.0.join("proc"),
                cgroup: mount,
            },
            limit_dirs: chain,
            last: None,
            ticks_per_sec: 100.0,
            page_size: 4096,
        };
        let l = s.limits();
        assert_eq!((l.cpus, l.mem, l.pids), (2.0, 4000, Some(64)));
    }

    #[test]
    fn tree_source_measures_this_process_tree() {
        // This test process's own tree: a child that sleeps uses no CPU but is a task.
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let me = std::process::id() as i32;
        let mut s = Sampler::new(Source::Tree(me), Roots::default());
        let t0 = Instant::now();
        assert_eq!(s.sample(t0).unwrap(), None);
        std::thread::sleep(Duration::from_millis(100));
        let r = s.sample(Instant::now()).unwrap().unwrap();
        let _ = child.kill();
        let _ = child.wait();
        assert!(r.procs >= 1, "{r:?}");
        assert!(r.cpu < 50.0, "{r:?}");
        assert!(r.mem > 0.0, "{r:?}");
    }
}
