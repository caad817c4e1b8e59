//! Spreading a study over several model servers. A study is many independent runs whose only
//! dependency is data: a student needs its weak teacher's labels, which travel back to the
//! trainer (the run folder's `weak_labels.jsonl`). So each (seed, scenario) goes in two phases —
//! every ceiling, then every student and bootstrapping chain — and within a phase the runs are
//! handed to the servers from one queue, one run in flight per server. A server that fails
//! mid-run (unreachable, its stream broken) is dropped from the pool and its run goes back to the
//! front of the queue for another server, where it starts again from its recorded job if that
//! server knows it, else from scratch; training is deterministic, so the predictions are the same
//! as on one server. The results come back in the order a single server would produce them.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Result, bail};
use model_server::ClientError;

use super::{Conflict, LabelFilter, Progress, Study, WeakLabel};
use crate::spec::Scenario;

/// One run (or one bootstrapping chain, which runs in order) of a phase.
#[derive(Debug, Clone)]
pub(super) enum Task {
    Ceiling {
        scenario: Scenario,
        model: String,
        seed: u64,
    },
    Bootstrap {
        scenario: Scenario,
        chain: [String; 3],
        seed: u64,
    },
    Student {
        scenario: Scenario,
        weak: String,
        strong: String,
        conflict: Conflict,
        seed: u64,
        filter: LabelFilter,
    },
    /// The on-policy loop's ceiling for `model`: its own ceiling as teacher and judge.
    GtJudged {
        scenario: Scenario,
        model: String,
        seed: u64,
    },
}

/// What a task produced: its run folders, and the labels a ceiling made.
pub(super) struct TaskOutput {
    pub dirs: Vec<PathBuf>,
    pub labels: Option<Vec<WeakLabel>>,
}

impl Study<'_> {
    async fn run_task(
        &mut self,
        task: &Task,
        labels: &BTreeMap<String, Vec<WeakLabel>>,
    ) -> Result<TaskOutput> {
        let teacher_labels = |weak: &str| {
            labels
                .get(weak)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no labels of the weak model {weak}"))
        };
        Ok(match task {
            Task::Ceiling {
                scenario,
                model,
                seed,
            } => {
                let (dir, labels) = self.ceiling(*scenario, model, *seed).await?;
                TaskOutput {
                    dirs: vec![dir],
                    labels: Some(labels),
                }
            }
            Task::Bootstrap {
                scenario,
                chain,
                seed,
            } => TaskOutput {
                dirs: self
                    .bootstrap(*scenario, chain, *seed, &teacher_labels(&chain[0])?)
                    .await?,
                labels: None,
            },
            Task::Student {
                scenario,
                weak,
                strong,
                conflict,
                seed,
                filter,
            } => TaskOutput {
                dirs: vec![
                    self.student(
                        *scenario,
                        weak,
                        strong,
                        *conflict,
                        *seed,
                        &teacher_labels(weak)?,
                        *filter,
                    )
                    .await?,
                ],
                labels: None,
            },
            Task::GtJudged {
                scenario,
                model,
                seed,
            } => TaskOutput {
                dirs: vec![
                    self.gt_judged(*scenario, model, *seed, &teacher_labels(model)?)
                        .await?,
                ],
                labels: None,
            },
        })
    }
}

/// Whether an error says the server is gone (rather than that the run itself is wrong).
pub(crate) fn is_server_failure(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        let status = cause.downcast_ref::<tonic::Status>().or_else(|| {
            match cause.downcast_ref::<ClientError>() {
                Some(ClientError::Rpc(status)) => Some(status),
                _ => None,
            }
        });
        if let Some(status) = status {
            return matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
            );
        }
        matches!(
            cause.downcast_ref::<ClientError>(),
            Some(ClientError::Connect { .. } | ClientError::JobFollow { .. })
        ) || cause.downcast_ref::<tonic::transport::Error>().is_some()
    })
}

/// Progress of one server's share of the work, into the study's one progress display; lines
/// are prefixed with the server when there are several.
pub(crate) struct ServerProgress<'p, 'q> {
    pub(crate) shared: &'p RefCell<&'q mut dyn Progress>,
    pub(crate) prefix: String,
}

impl Progress for ServerProgress<'_, '_> {
    fn line(&mut self, text: &str) {
        // Keep the indentation of step lines in front (the terminal display filters on it).
        let indent = text.len() - text.trim_start().len();
        let (spaces, rest) = text.split_at(indent);
        self.shared
            .borrow_mut()
            .line(&format!("{spaces}{}{rest}", self.prefix));
    }
    fn run_started(&mut self, run_id: &str) {
        self.shared
            .borrow_mut()
            .run_started(&format!("{}{run_id}", self.prefix));
    }
    fn step(&mut self, stage: &str, step: u64, total: u64) {
        self.shared
            .borrow_mut()
            .step(&format!("{}{stage}", self.prefix), step, total);
    }
    fn run_done(&mut self) {
        self.shared.borrow_mut().run_done();
    }
}

/// Runs a phase's tasks over the servers still alive; outputs in task order.
pub(super) async fn run_phase(
    workers: &mut [Study<'_>],
    alive: &[Cell<bool>],
    tasks: Vec<Task>,
    labels: &BTreeMap<String, Vec<WeakLabel>>,
) -> Result<Vec<TaskOutput>> {
    spread(
        workers,
        alive,
        tasks,
        async |worker: &mut Study<'_>, task: &Task| worker.run_task(task, labels).await,
        |worker: &mut Study<'_>, server, e| {
            worker.progress.line(&format!(
                "server {server} failed ({e:#}); it leaves the pool and its run goes to another server"
            ))
        },
    )
    .await
}

/// Hands `tasks` to the workers still `alive` (one per server), one task in flight each, from
/// one queue. A task that fails because its server is gone ([`is_server_failure`], with more
/// than one server) goes back to the front of the queue for another worker, and that worker
/// is marked dead (`on_failure` reports it); any other error stops the whole phase. Outputs
/// come back in task order.
pub(crate) async fn spread<W, T, O>(
    workers: &mut [W],
    alive: &[Cell<bool>],
    tasks: Vec<T>,
    run: impl AsyncFn(&mut W, &T) -> Result<O>,
    on_failure: impl Fn(&mut W, usize, &anyhow::Error),
) -> Result<Vec<O>> {
    let total = tasks.len();
    let queue = RefCell::new(tasks.into_iter().enumerate().collect::<VecDeque<_>>());
    let in_flight = Cell::new(0usize);
    let outputs = RefCell::new(BTreeMap::new());
    let fatal: RefCell<Option<anyhow::Error>> = RefCell::new(None);
    let several = workers.len() > 1;
    let (run, on_failure) = (&run, &on_failure);
    let loops = workers
        .iter_mut()
        .zip(alive)
        .enumerate()
        .filter(|(_, (_, alive))| alive.get())
        .map(|(server, (worker, alive))| {
            let (queue, in_flight, outputs, fatal) = (&queue, &in_flight, &outputs, &fatal);
            async move {
                loop {
                    if fatal.borrow().is_some() {
                        return;
                    }
                    let next = queue.borrow_mut().pop_front();
                    let Some((index, task)) = next else {
                        if in_flight.get() == 0 {
                            return;
                        }
                        // Another server may fail and hand its task back.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    in_flight.set(in_flight.get() + 1);
                    let result = run(worker, &task).await;
                    in_flight.set(in_flight.get() - 1);
                    match result {
                        Ok(output) => {
                            outputs.borrow_mut().insert(index, output);
                        }
                        Err(e) if several && is_server_failure(&e) => {
                            on_failure(worker, server, &e);
                            alive.set(false);
                            queue.borrow_mut().push_front((index, task));
                            return;
                        }
                        Err(e) => {
                            *fatal.borrow_mut() = Some(e);
                            return;
                        }
                    }
                }
            }
        });
    futures_util::future::join_all(loops).await;
    if let Some(e) = fatal.into_inner() {
        return Err(e);
    }
    let outputs = outputs.into_inner();
    if outputs.len() < total {
        bail!(
            "every model server failed: {} of {total} tasks were not done",
            total - outputs.len()
        );
    }
    Ok(outputs.into_values().collect())
}
