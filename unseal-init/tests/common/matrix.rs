//! Running a fault matrix: every (step, column) cell on a few worker threads at once, since most
//! of a cell is waiting on OpenBao or a child process, and the outcome table as markdown.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

/// The number of cells run at once: `var` when set to a positive number, else `default`.
pub fn jobs(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n: &usize| *n > 0)
        .unwrap_or(default)
}

/// Every step crossed with every column, steps outermost.
pub fn cells<S: Copy, C: Copy>(steps: &[S], columns: &[C]) -> Vec<(S, C)> {
    steps
        .iter()
        .flat_map(|s| columns.iter().map(move |c| (*s, *c)))
        .collect()
}

/// Runs `run` on every cell, `jobs` at a time, and returns the outcomes in the cells' order.
/// A cell that panics yields `panicked(message)` instead of taking the other cells down.
pub fn run_all<T: Copy + Send + Sync, O: Send>(
    cells: &[T],
    jobs: usize,
    run: impl Fn(T) -> O + Sync,
    panicked: impl Fn(String) -> O + Sync,
) -> Vec<O> {
    let next = Mutex::new(0usize);
    let results: Mutex<Vec<Option<O>>> = Mutex::new((0..cells.len()).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..jobs.max(1) {
            scope.spawn(|| {
                loop {
                    let i = {
                        let mut n = next.lock().expect("queue");
                        let i = *n;
                        *n += 1;
                        i
                    };
                    let Some(&cell) = cells.get(i) else {
                        return;
                    };
                    let outcome =
                        catch_unwind(AssertUnwindSafe(|| run(cell))).unwrap_or_else(|p| {
                            let why = p
                                .downcast_ref::<String>()
                                .cloned()
                                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                                .unwrap_or_default();
                            panicked(why)
                        });
                    results.lock().expect("results")[i] = Some(outcome);
                }
            });
        }
    });
    results
        .into_inner()
        .expect("results")
        .into_iter()
        .map(|o| o.expect("every cell ran"))
        .collect()
}

/// A markdown table: one row per step, one column per column label, each cell's text from
/// `text` (`None`: the cell was not run).
pub fn markdown<S: Copy, C: Copy>(
    steps: &[S],
    step_label: impl Fn(S) -> String,
    columns: &[C],
    column_label: impl Fn(C) -> String,
    text: impl Fn(S, C) -> Option<String>,
) -> String {
    let mut out = String::from("| step |");
    for c in columns {
        out.push_str(&format!(" {} |", column_label(*c)));
    }
    out.push_str("\n|---|");
    out.push_str(&"---|".repeat(columns.len()));
    for s in steps {
        out.push_str(&format!("\n| {} |", step_label(*s)));
        for c in columns {
            let t = text(*s, *c).unwrap_or_else(|| "not run".to_owned());
            out.push_str(&format!(" {t} |"));
        }
    }
    out.push('\n');
    out
}

/// What a cell of a fault matrix ended with, as the table shows it.
pub trait CellOutcome {
    /// The table cell's text.
    fn text(&self) -> String;
    /// Why the cell broke the promise, if it did.
    fn failure(&self) -> Option<&str>;
}

/// A fault matrix: steps down, columns across.
pub struct Matrix<S, C> {
    /// The steps a fault hits, one row each.
    pub steps: Vec<S>,
    /// The faults and next starts, one column each.
    pub columns: Vec<C>,
    /// A step's row label.
    pub step_label: fn(S) -> String,
    /// A column's label.
    pub column_label: fn(C) -> String,
}

impl<S, C> Matrix<S, C>
where
    S: Copy + PartialEq + Send + Sync,
    C: Copy + PartialEq + Send + Sync,
{
    /// Runs every cell (`jobs` at a time), prints the table and `footer`, and fails naming
    /// every cell that broke the promise.
    pub fn run_and_check<O: CellOutcome + Send>(
        &self,
        jobs: usize,
        run: impl Fn(S, C) -> O + Sync,
        panicked: impl Fn(String) -> O + Sync,
        footer: &str,
    ) {
        let cells = cells(&self.steps, &self.columns);
        let outcomes = run_all(&cells, jobs, |(s, c)| run(s, c), panicked);
        let mut table = markdown(
            &self.steps,
            self.step_label,
            &self.columns,
            self.column_label,
            |s, c| {
                let i = cells.iter().position(|x| *x == (s, c))?;
                Some(outcomes[i].text())
            },
        );
        table.push_str(footer);
        let failures: Vec<String> = cells
            .iter()
            .zip(&outcomes)
            .filter_map(|((s, c), o)| {
                let why = o.failure()?;
                Some(format!(
                    "{} / {}: {why}",
                    (self.step_label)(*s),
                    (self.column_label)(*c)
                ))
            })
            .collect();
        println!("{table}");
        assert!(failures.is_empty(), "{table}\n{}", failures.join("\n\n"));
    }
}
