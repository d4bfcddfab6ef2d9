//! The Raft node under a simulated network: message loss, reordering, duplication, partitions, crashes and
//! restarts, all driven by one seeded random generator so every run can be replayed.
//!
//! Set `KILN_SIM_SEED=N` to replay one seed; a failure prints the seed it ran with.

use std::collections::{BTreeMap, BTreeSet};

use kiln_coordinator::node::{Node, NodeConfig, Reply, SnapshotTask, Token, raft_logger};
use kiln_coordinator::spec::parse_job_spec;
use kiln_coordinator::state::{Command, CommandResult, Query, QueryResult};
use kiln_coordinator::storage::{Databases, LogStore};
use raft::eraftpb::{ConfChangeType, Message, MessageType};

/// A small deterministic generator (xorshift64*), so the test needs no RNG crate and replays exactly.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, bound: u64) -> u64 {
        self.next() % bound
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[derive(Default, Clone, Copy)]
struct Faults {
    drop_percent: u64,
    duplicate_percent: u64,
    /// Messages are delivered in a random order within each round when true.
    reorder: bool,
}

struct Sim {
    rng: Rng,
    nodes: BTreeMap<u64, Option<Node>>,
    databases: BTreeMap<u64, Databases>,
    /// Snapshot tasks the nodes handed out, finished a few rounds later as a background thread would.
    snapshot_tasks: Vec<(u64, usize, SnapshotTask)>,
    round_number: usize,
    config: NodeConfig,
    network: Vec<Message>,
    /// Pairs (from, to) whose messages are lost.
    cut: BTreeSet<(u64, u64)>,
    faults: Faults,
    next_token: Token,
    /// Submissions waiting for an answer: token → (idempotency key, node asked).
    waiting: BTreeMap<Token, (String, u64)>,
    /// Every submission acknowledged to its client: key → job id.
    acknowledged: BTreeMap<String, u64>,
    /// Every other reply, by token.
    replies: BTreeMap<Token, Reply>,
}

fn submit_command(key: &str) -> Command {
    let spec_toml = format!("name = \"sim\"\nkind = \"command\"\ncommand = \"echo\"\nargs = [\"{key}\"]\n");
    let spec = parse_job_spec("sim", &spec_toml).expect("valid spec");
    Command::SubmitJob {
        spec,
        spec_toml,
        idempotency_key: key.to_string(),
        now_ms: 1,
    }
}

impl Sim {
    fn new(seed: u64, voters: &[u64], config: NodeConfig) -> Sim {
        let mut sim = Sim {
            rng: Rng(seed.max(1)),
            nodes: BTreeMap::new(),
            databases: BTreeMap::new(),
            snapshot_tasks: Vec::new(),
            round_number: 0,
            config,
            network: Vec::new(),
            cut: BTreeSet::new(),
            faults: Faults::default(),
            next_token: 0,
            waiting: BTreeMap::new(),
            acknowledged: BTreeMap::new(),
            replies: BTreeMap::new(),
        };
        for &id in voters {
            let databases = Databases::in_memory().unwrap();
            let mut store = LogStore::open(databases.clone()).unwrap();
            store.bootstrap(voters, Vec::new()).unwrap();
            sim.databases.insert(id, databases);
            sim.nodes.insert(id, Some(sim.start(id, store)));
        }
        sim
    }

    fn start(&self, id: u64, store: LogStore) -> Node {
        let mut config = self.config.clone();
        config.id = id;
        // Fixed, staggered election timeouts: raft-rs's own randomness is not seeded, this is.
        config.election_ticks = 10 + 3 * id as usize;
        config.election_ticks_max = config.election_ticks + 1;
        Node::new(config, store, &raft_logger()).unwrap()
    }

    /// A node that joins later: empty log, waits to be added.
    fn add_blank(&mut self, id: u64) {
        let databases = Databases::in_memory().unwrap();
        let store = LogStore::open(databases.clone()).unwrap();
        self.databases.insert(id, databases);
        let node = self.start(id, store);
        self.nodes.insert(id, Some(node));
    }

    fn crash(&mut self, id: u64) {
        self.nodes.insert(id, None);
        // Messages in flight to it are lost; a leader must hear that its snapshot was, as the real
        // transport tells it, or it waits on that member forever.
        for message in self.network.iter().filter(|message| message.to == id) {
            if message.get_msg_type() == MessageType::MsgSnapshot
                && let Some(sender) = self.nodes.get_mut(&message.from).and_then(Option::as_mut)
            {
                sender.report_snapshot(id, false);
            }
        }
        self.network.retain(|message| message.to != id);
        // A crash takes the snapshot thread with it; the restarted node starts a new one when due.
        self.snapshot_tasks.retain(|(node, _, _)| *node != id);
        // Its callers lose their connection: no answer will come.
        self.waiting.retain(|_, (_, asked)| *asked != id);
    }

    fn restart(&mut self, id: u64) {
        let store = LogStore::open(self.databases[&id].clone()).unwrap();
        let node = self.start(id, store);
        self.nodes.insert(id, Some(node));
    }

    fn isolate(&mut self, id: u64) {
        for &other in self.nodes.keys() {
            if other != id {
                self.cut.insert((id, other));
                self.cut.insert((other, id));
            }
        }
    }

    fn heal(&mut self) {
        self.cut.clear();
    }

    fn node(&mut self, id: u64) -> &mut Node {
        self.nodes
            .get_mut(&id)
            .and_then(Option::as_mut)
            .expect("node is running")
    }

    fn leader(&self) -> Option<u64> {
        let leaders: Vec<u64> = self
            .nodes
            .iter()
            .filter_map(|(id, node)| node.as_ref().filter(|node| node.is_leader()).map(|_| *id))
            .collect();
        // Two nodes may both believe they lead during a partition (different terms); pick the newest.
        leaders
            .into_iter()
            .max_by_key(|id| self.nodes[id].as_ref().map(|node| node.status().term))
    }

    fn token(&mut self) -> Token {
        self.next_token += 1;
        self.next_token
    }

    fn propose_on(&mut self, id: u64, key: &str) -> Token {
        let token = self.token();
        self.waiting.insert(token, (key.to_string(), id));
        self.node(id).propose(token, &submit_command(key));
        token
    }

    /// One round: every running node ticks, the network delivers (with faults), every node runs Ready.
    fn round(&mut self) {
        self.round_number += 1;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let now = self.round_number;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.snapshot_tasks)
            .into_iter()
            .partition(|(_, due, _)| *due <= now);
        self.snapshot_tasks = waiting;
        for (id, _, task) in done {
            if let Some(node) = self.nodes.get_mut(&id).and_then(Option::as_mut) {
                node.snapshot_saved(task.run()).unwrap();
            }
        }
        for id in &ids {
            if let Some(node) = self.nodes.get_mut(id).and_then(Option::as_mut) {
                node.tick();
            }
        }
        let mut deliver = std::mem::take(&mut self.network);
        if self.faults.reorder {
            for index in (1..deliver.len()).rev() {
                let other = self.rng.below(index as u64 + 1) as usize;
                deliver.swap(index, other);
            }
        }
        for message in deliver {
            // Like the real transport, tell a leader whether its snapshot arrived, or it waits forever.
            let snapshot = (message.get_msg_type() == MessageType::MsgSnapshot).then_some((message.from, message.to));
            let lost = self.cut.contains(&(message.from, message.to))
                || self.rng.chance(self.faults.drop_percent)
                || !self.nodes.get(&message.to).is_some_and(Option::is_some);
            if let Some((from, to)) = snapshot
                && let Some(sender) = self.nodes.get_mut(&from).and_then(Option::as_mut)
            {
                sender.report_snapshot(to, !lost);
            }
            if lost {
                continue;
            }
            let duplicate = self.rng.chance(self.faults.duplicate_percent).then(|| message.clone());
            if let Some(node) = self.nodes.get_mut(&message.to).and_then(Option::as_mut) {
                node.step(message);
                if let Some(copy) = duplicate {
                    node.step(copy);
                }
            }
        }
        for id in &ids {
            let Some(node) = self.nodes.get_mut(id).and_then(Option::as_mut) else {
                continue;
            };
            let output = node.ready().unwrap();
            self.network.extend(output.messages);
            if let Some(task) = output.snapshot {
                let due = self.round_number + self.rng.below(4) as usize;
                self.snapshot_tasks.push((*id, due, task));
            }
            for (token, reply) in output.replies {
                match (self.waiting.remove(&token), reply) {
                    (Some((key, _)), Reply::Command(CommandResult::Submitted { job, .. })) => {
                        if let Some(previous) = self.acknowledged.insert(key.clone(), job.id) {
                            assert_eq!(previous, job.id, "key {key} acknowledged with two different jobs");
                        }
                    }
                    (_, reply) => {
                        self.replies.insert(token, reply);
                    }
                }
            }
        }
    }

    fn run(&mut self, rounds: usize) {
        for _ in 0..rounds {
            self.round();
        }
    }

    fn wait_for_leader(&mut self, rounds: usize) -> u64 {
        for _ in 0..rounds {
            if let Some(leader) = self.leader() {
                return leader;
            }
            self.round();
        }
        panic!("no leader after {rounds} rounds");
    }

    /// Heals everything and runs until every running node has applied the same index.
    fn converge(&mut self) {
        self.heal();
        self.faults = Faults::default();
        for _ in 0..2_000 {
            self.round();
            let applied: BTreeSet<u64> = self.nodes.values().flatten().map(|node| node.applied_index()).collect();
            let commits: BTreeSet<u64> = self
                .nodes
                .values()
                .flatten()
                .map(|node| node.status().commit_index)
                .collect();
            if applied.len() == 1 && commits.len() == 1 && self.leader().is_some() && self.waiting.is_empty() {
                return;
            }
        }
        let statuses: Vec<_> = self.nodes.values().flatten().map(Node::status).collect();
        panic!(
            "the cluster did not converge; waiting {:?}; {statuses:#?}",
            self.waiting
        );
    }

    /// Every running node holds the same state, and every acknowledged job is in it exactly once.
    fn verify(&mut self) {
        let states: Vec<_> = self.nodes.values().flatten().map(|node| node.state().clone()).collect();
        for state in &states[1..] {
            assert_eq!(state, &states[0], "replicas disagree");
        }
        let jobs: Vec<_> = states[0].jobs().cloned().collect();
        let mut by_key: BTreeMap<&str, usize> = BTreeMap::new();
        for job in &jobs {
            *by_key.entry(job.idempotency_key.as_str()).or_default() += 1;
        }
        assert!(by_key.values().all(|count| *count == 1), "a key created two jobs");
        for (key, id) in &self.acknowledged {
            let job = jobs
                .iter()
                .find(|job| job.id == *id)
                .unwrap_or_else(|| panic!("acknowledged job {id} ({key}) is lost"));
            assert_eq!(&job.idempotency_key, key);
        }
    }
}

fn seeds() -> Vec<u64> {
    match std::env::var("KILN_SIM_SEED") {
        Ok(seed) => vec![seed.parse().expect("KILN_SIM_SEED is a number")],
        Err(_) => (1..=12).map(|seed| seed * 7919).collect(),
    }
}

fn small_config() -> NodeConfig {
    let mut config = NodeConfig::new(0);
    config.snapshot_interval_entries = 40;
    config.request_timeout_ticks = 60;
    config
}

/// Random faults, crashes and restarts while clients keep submitting and retrying with their keys.
#[test]
fn chaos_keeps_every_acknowledged_job_exactly_once() {
    for seed in seeds() {
        eprintln!("seed {seed}");
        let mut sim = Sim::new(seed, &[1, 2, 3, 4, 5], small_config());
        sim.faults = Faults {
            drop_percent: 10,
            duplicate_percent: 5,
            reorder: true,
        };
        let mut pending: Vec<String> = Vec::new();
        let mut down: Option<(u64, usize)> = None;
        for round in 0..1_500usize {
            // Clients: a new submission now and then, and retries of unanswered ones (same key).
            if round % 3 == 0 {
                pending.push(format!("key-{seed}-{round}"));
            }
            if let Some(leader) = sim.leader()
                && !pending.is_empty()
            {
                let key = pending.remove(0);
                if !sim.acknowledged.contains_key(&key) {
                    sim.propose_on(leader, &key);
                    if sim.rng.chance(30) {
                        pending.push(key);
                    }
                }
            }
            // Faults: crash a node and bring it back later; sometimes cut one off.
            match down {
                None if sim.rng.chance(2) => {
                    let victim = 1 + sim.rng.below(5);
                    sim.crash(victim);
                    down = Some((victim, round + 20 + sim.rng.below(100) as usize));
                }
                Some((victim, until)) if round >= until => {
                    sim.restart(victim);
                    down = None;
                }
                _ => {}
            }
            if round % 200 == 50 {
                let victim = 1 + sim.rng.below(5);
                sim.isolate(victim);
            }
            if round % 200 == 120 {
                sim.heal();
            }
            sim.round();
        }
        if let Some((victim, _)) = down {
            sim.restart(victim);
        }
        sim.converge();
        // Retry whatever was never acknowledged; a key that did commit returns its job, not a new one.
        let unanswered: Vec<String> = pending
            .into_iter()
            .filter(|key| !sim.acknowledged.contains_key(key))
            .collect();
        for key in unanswered {
            let leader = sim.wait_for_leader(200);
            sim.propose_on(leader, &key);
            sim.converge();
        }
        sim.verify();
        let applied = sim.node(1).applied_index();
        eprintln!(
            "seed {seed}: {} acknowledged, applied index {applied}",
            sim.acknowledged.len()
        );
        assert!(
            sim.acknowledged.len() > 50,
            "seed {seed}: only {} submissions got through",
            sim.acknowledged.len()
        );
        let snapshot_index = sim.node(1).status().snapshot_index;
        assert!(snapshot_index > 0, "seed {seed}: the log was never compacted");
    }
}

#[test]
fn isolated_minority_cannot_commit_and_rejoins() {
    for seed in seeds() {
        eprintln!("seed {seed}");
        let mut sim = Sim::new(seed, &[1, 2, 3], small_config());
        let old_leader = sim.wait_for_leader(200);
        sim.propose_on(old_leader, "before");
        sim.run(20);
        assert!(sim.acknowledged.contains_key("before"));

        sim.isolate(old_leader);
        let lost = sim.propose_on(old_leader, "in-minority");
        sim.run(100);
        assert!(
            !sim.acknowledged.contains_key("in-minority"),
            "seed {seed}: an isolated leader committed"
        );
        let new_leader = sim.leader().expect("the majority elected a leader");
        assert_ne!(new_leader, old_leader);
        sim.propose_on(new_leader, "in-majority");
        sim.run(50);
        assert!(
            sim.acknowledged.contains_key("in-majority"),
            "seed {seed}: the majority could not commit"
        );

        sim.converge();
        sim.verify();
        let jobs: Vec<String> = sim
            .node(old_leader)
            .state()
            .jobs()
            .map(|job| job.idempotency_key.clone())
            .collect();
        assert_eq!(jobs, ["before", "in-majority"], "seed {seed}");
        assert!(
            matches!(sim.replies.get(&lost), Some(Reply::Failed(error)) if error.is_retryable()),
            "seed {seed}: the minority's client must hear a retryable failure, got {:?}",
            sim.replies.get(&lost)
        );
    }
}

#[test]
fn lagging_member_catches_up_by_snapshot_and_reads_are_current() {
    let mut sim = Sim::new(7, &[1, 2, 3], small_config());
    let leader = sim.wait_for_leader(200);
    let lagging = if leader == 3 { 2 } else { 3 };
    sim.crash(lagging);
    for index in 0..150 {
        sim.propose_on(leader, &format!("job-{index}"));
        sim.run(2);
    }
    sim.run(20);
    assert_eq!(sim.acknowledged.len(), 150);
    assert!(
        sim.node(leader).status().first_log_index > 1,
        "the leader compacted its log"
    );
    sim.restart(lagging);
    sim.converge();
    sim.verify();
    assert!(
        sim.node(lagging).status().snapshot_index > 0,
        "the lagging node installed a snapshot"
    );

    // A read on the follower sees every write acknowledged before it was issued.
    let token = sim.token();
    sim.node(lagging).read(
        token,
        Query::ListJobs {
            states: Vec::new(),
            limit: 0,
            after_id: 0,
        },
    );
    sim.run(10);
    match sim.replies.get(&token) {
        Some(Reply::Query(QueryResult::Jobs(jobs))) => assert_eq!(jobs.len(), 150),
        other => panic!("read answered {other:?}"),
    }
}

#[test]
fn membership_grows_shrinks_and_leadership_moves() {
    let mut sim = Sim::new(11, &[1], small_config());
    assert_eq!(sim.wait_for_leader(100), 1);
    sim.propose_on(1, "first");
    sim.run(5);
    for id in [2, 3] {
        sim.add_blank(id);
        let token = sim.token();
        sim.node(1)
            .propose_conf_change(token, ConfChangeType::AddLearnerNode, id, &format!("node-{id}"));
        sim.run(30);
        let token = sim.token();
        sim.node(1)
            .propose_conf_change(token, ConfChangeType::AddNode, id, &format!("node-{id}"));
        sim.run(30);
        let statuses: Vec<_> = sim.nodes.values().flatten().map(Node::status).collect();
        assert!(
            matches!(sim.replies.get(&token), Some(Reply::ConfChanged { .. })),
            "adding {id}: {:?} {statuses:#?}",
            sim.replies.get(&token)
        );
    }
    assert_eq!(sim.node(3).status().voters, vec![1, 2, 3]);
    assert_eq!(sim.node(2).state().members()[&3].raft_addr, "node-3");

    sim.node(1).transfer_leader(2);
    sim.run(30);
    assert_eq!(sim.leader(), Some(2));

    let token = sim.token();
    sim.node(2)
        .propose_conf_change(token, ConfChangeType::RemoveNode, 3, "");
    sim.run(30);
    assert_eq!(sim.node(1).status().voters, vec![1, 2]);
    sim.crash(3);
    sim.propose_on(2, "after-removal");
    sim.run(30);
    assert!(
        sim.acknowledged.contains_key("after-removal"),
        "two voters commit without the removed one"
    );
    sim.converge();
    sim.verify();
}
