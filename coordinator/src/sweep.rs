//! Hyperparameter sweeps, the parts that decide: the search space a sweep names, the searchers that
//! suggest each trial's parameters (grid, random, TPE) and the schedulers that stop trials early (ASHA,
//! Hyperband). All sans-IO and deterministic in their inputs (the space, the seed, the trial's number and
//! the history so far), so the sweep controller on the leader can feed them the replicated history and
//! propose what they answer through Raft: a new leader continues the search where the old one stopped.
//!
//! The space, as a sweep's TOML names it:
//!
//! ```toml
//! [space]
//! learning_rate = { log_uniform = [1e-4, 1e-1] }
//! dropout = { uniform = [0.0, 0.5] }
//! layers = { int = [1, 4] }
//! hidden = { choice = [64, 128, 256] }
//! # A nested choice: momentum exists only in trials that picked sgd.
//! optimizer = { choice = ["adam", { value = "sgd", space = { momentum = { uniform = [0.0, 0.99] } } }] }
//! ```
//!
//! Grid search needs a finite space: a continuous range takes `steps = N` (N evenly spaced points, in log
//! space for a log-uniform one).
//!
//! TPE is the Tree-structured Parzen Estimator (Bergstra et al., 2011) in its multivariate form (Falkner et
//! al., 2018), as Optuna builds it: 10 random startup trials, Parzen estimators whose kernels span every
//! parameter of a level at once, with Optuna's prior kernel, weights and bandwidths clipped to the range,
//! candidates drawn from the good density and the one with the highest ratio to the bad density kept. Five
//! settings ([`TpeSettings::KILN`]) differ from Optuna's defaults, chosen on held-out seeds of Branin and
//! Hartmann-6: the good group is the best `min(ceil(0.2 n), 25)` observations (Optuna: 0.1 n), and its
//! better members weigh more (the one ranked `r` of `k` by `((k - r) / k)²`; Optuna weighs them alike),
//! every kernel is 0.6 times as wide as Optuna's rule makes it, 64 candidates are scored (24), and TPE
//! starts after 6 random trials (10). A nested choice's parameters are modelled after it, from the trials
//! that picked the same alternative.
//!
//! ASHA (Li et al., 2020) checks a trial at each rung `min_resource · eta^k`: it goes on only if its value
//! is in the best `1/eta` of the values recorded at that rung so far. Hyperband runs several ASHA brackets
//! with different first rungs and spreads trials over them, more to the aggressive ones.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Why a sweep definition cannot be used; the message names the parameter and what was expected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{0}")]
pub struct SweepError(pub String);

fn refuse<T>(message: impl Into<String>) -> Result<T, SweepError> {
    Err(SweepError(message.into()))
}

/// One parameter's value in a trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    Text(String),
}

impl Value {
    fn from_toml(path: &str, value: &toml::Value) -> Result<Value, SweepError> {
        match value {
            toml::Value::Boolean(value) => Ok(Value::Bool(*value)),
            toml::Value::Integer(value) => Ok(Value::Int(*value)),
            toml::Value::Float(value) => Ok(Value::Float(*value)),
            toml::Value::String(value) => Ok(Value::Text(value.clone())),
            other => refuse(format!(
                "'{path}': a choice is {}, expected a number, a string or a boolean (or {{ value = …, space = {{ … }} }})",
                other.type_str()
            )),
        }
    }

    /// The value as a number, for the numeric domains (an integer is also a float).
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Int(value) => Some(*value as f64),
            Value::Float(value) => Some(*value),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(value) => write!(formatter, "{value}"),
            Value::Int(value) => write!(formatter, "{value}"),
            Value::Float(value) => write!(formatter, "{value}"),
            Value::Text(value) => write!(formatter, "{value}"),
        }
    }
}

/// A trial's parameters, by name. A nested choice's parameters appear only when their alternative did.
pub type Params = BTreeMap<String, Value>;

/// The values one parameter may take.
#[derive(Debug, Clone, PartialEq)]
pub enum Domain {
    /// A float in `[low, high]`; `steps` points for grid search.
    Uniform { low: f64, high: f64, steps: Option<u32> },
    /// A float in `[low, high]`, `0 < low`, sampled evenly in log space.
    LogUniform { low: f64, high: f64, steps: Option<u32> },
    /// An integer in `[low, high]`, both included.
    Int { low: i64, high: i64 },
    /// One of the alternatives, each with the parameters that exist only when it is picked.
    Choice(Vec<Alternative>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Alternative {
    pub value: Value,
    pub space: Space,
}

/// Parameters and their domains, in name order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Space {
    pub params: BTreeMap<String, Domain>,
}

/// The most points a grid may have.
pub const GRID_POINTS_MAX: usize = 100_000;

impl Space {
    /// The space of a sweep's `[space]` table. Refuses an empty space, an empty or inverted range, a
    /// log-uniform range that reaches 0, an empty choice and a nested parameter that shadows an outer one.
    pub fn from_toml(table: &toml::Table) -> Result<Space, SweepError> {
        let space = Space::parse("space", table, &[])?;
        if space.params.is_empty() {
            return refuse(
                "the search space is empty; expected at least one parameter, such as learning_rate = { log_uniform = [1e-4, 1e-1] }",
            );
        }
        Ok(space)
    }

    fn parse(path: &str, table: &toml::Table, outer: &[&str]) -> Result<Space, SweepError> {
        let mut params = BTreeMap::new();
        let names: Vec<&str> = outer.iter().copied().chain(table.keys().map(String::as_str)).collect();
        for (name, definition) in table {
            let here = format!("{path}.{name}");
            if outer.contains(&name.as_str()) {
                return refuse(format!(
                    "'{here}' shadows a parameter of the enclosing space; expected a name of its own"
                ));
            }
            let toml::Value::Table(definition) = definition else {
                return refuse(format!(
                    "'{here}' is {}, expected a table such as {{ uniform = [0.0, 1.0] }}",
                    definition.type_str()
                ));
            };
            params.insert(name.clone(), Domain::parse(&here, definition, &names)?);
        }
        Ok(Space { params })
    }

    /// A random point: every parameter, and the parameters of the alternatives picked.
    pub fn sample(&self, rng: &mut StdRng) -> Params {
        let mut params = Params::new();
        self.sample_into(rng, &mut params);
        params
    }

    fn sample_into(&self, rng: &mut StdRng, params: &mut Params) {
        for (name, domain) in &self.params {
            match domain {
                Domain::Uniform { low, high, .. } => {
                    params.insert(name.clone(), Value::Float(rng.random_range(*low..=*high)));
                }
                Domain::LogUniform { low, high, .. } => {
                    let exponent = rng.random_range(low.ln()..=high.ln());
                    params.insert(name.clone(), Value::Float(exponent.exp().clamp(*low, *high)));
                }
                Domain::Int { low, high } => {
                    params.insert(name.clone(), Value::Int(rng.random_range(*low..=*high)));
                }
                Domain::Choice(alternatives) => {
                    let picked = &alternatives[rng.random_range(0..alternatives.len())];
                    params.insert(name.clone(), picked.value.clone());
                    picked.space.sample_into(rng, params);
                }
            }
        }
    }

    /// Every point of the grid, in a fixed order. Refuses a continuous range without `steps` and a grid
    /// of more than [`GRID_POINTS_MAX`] points.
    pub fn grid(&self) -> Result<Vec<Params>, SweepError> {
        let mut points = vec![Params::new()];
        for (name, domain) in &self.params {
            let mut next = Vec::new();
            for point in &points {
                for (value, nested) in domain.grid_values(name)? {
                    let nested = match nested {
                        Some(space) => space.grid()?,
                        None => vec![Params::new()],
                    };
                    for inner in nested {
                        let mut extended = point.clone();
                        extended.insert(name.clone(), value.clone());
                        extended.extend(inner);
                        next.push(extended);
                        if next.len() > GRID_POINTS_MAX {
                            return refuse(format!(
                                "the grid has more than {GRID_POINTS_MAX} points; expected fewer steps or choices"
                            ));
                        }
                    }
                }
            }
            points = next;
        }
        Ok(points)
    }
}

impl Domain {
    fn parse(path: &str, table: &toml::Table, outer: &[&str]) -> Result<Domain, SweepError> {
        let kinds: Vec<&str> = ["uniform", "log_uniform", "int", "choice"]
            .into_iter()
            .filter(|kind| table.contains_key(*kind))
            .collect();
        let [kind] = kinds.as_slice() else {
            return refuse(format!(
                "'{path}' names {} of uniform, log_uniform, int and choice; expected exactly one",
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(" and ")
                }
            ));
        };
        for key in table.keys() {
            if key.as_str() != *kind && !(key == "steps" && matches!(*kind, "uniform" | "log_uniform")) {
                return refuse(format!(
                    "'{path}' has an unknown key '{key}'; expected only '{kind}'{}",
                    if matches!(*kind, "uniform" | "log_uniform") {
                        " and 'steps'"
                    } else {
                        ""
                    }
                ));
            }
        }
        let steps = match table.get("steps") {
            None => None,
            Some(toml::Value::Integer(steps)) if (2..=10_000).contains(steps) => Some(*steps as u32),
            Some(other) => {
                return refuse(format!(
                    "'{path}.steps' is {other}; expected an integer from 2 to 10000"
                ));
            }
        };
        let value = &table[*kind];
        match *kind {
            "choice" => {
                let toml::Value::Array(items) = value else {
                    return refuse(format!("'{path}.choice' is {}, expected a list", value.type_str()));
                };
                if items.is_empty() {
                    return refuse(format!("'{path}.choice' is empty; expected at least one alternative"));
                }
                let alternatives = items
                    .iter()
                    .map(|item| match item {
                        toml::Value::Table(nested) => {
                            let Some(value) = nested.get("value") else {
                                return refuse(format!(
                                    "'{path}.choice' has a table without 'value'; expected {{ value = …, space = {{ … }} }}"
                                ));
                            };
                            let value = Value::from_toml(path, value)?;
                            let space = match nested.get("space") {
                                None => Space::default(),
                                Some(toml::Value::Table(space)) => Space::parse(&format!("{path}.{value}"), space, outer)?,
                                Some(other) => {
                                    return refuse(format!(
                                        "'{path}.{value}.space' is {}, expected a table of parameters",
                                        other.type_str()
                                    ));
                                }
                            };
                            Ok(Alternative { value, space })
                        }
                        scalar => Ok(Alternative {
                            value: Value::from_toml(path, scalar)?,
                            space: Space::default(),
                        }),
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Domain::Choice(alternatives))
            }
            "int" => {
                let (low, high) = bounds(path, kind, value)?;
                if low.fract() != 0.0 || high.fract() != 0.0 {
                    return refuse(format!("'{path}.int' is [{low}, {high}]; expected whole numbers"));
                }
                Ok(Domain::Int {
                    low: low as i64,
                    high: high as i64,
                })
            }
            _ => {
                let (low, high) = bounds(path, kind, value)?;
                if *kind == "log_uniform" {
                    if low <= 0.0 {
                        return refuse(format!(
                            "'{path}': the log-uniform range [{low}, {high}] includes 0 or less; expected 0 < low < high"
                        ));
                    }
                    Ok(Domain::LogUniform { low, high, steps })
                } else {
                    Ok(Domain::Uniform { low, high, steps })
                }
            }
        }
    }

    /// The values a grid takes for this parameter, each with the nested space it opens.
    fn grid_values(&self, name: &str) -> Result<Vec<(Value, Option<&Space>)>, SweepError> {
        let spaced = |low: f64, high: f64, steps: u32| -> Vec<f64> {
            (0..steps)
                .map(|index| low + (high - low) * index as f64 / (steps - 1) as f64)
                .collect()
        };
        Ok(match self {
            Domain::Uniform { low, high, steps } | Domain::LogUniform { low, high, steps } => {
                let Some(steps) = steps else {
                    return refuse(format!(
                        "grid search needs a finite space: '{name}' is a continuous range; give it steps = N"
                    ));
                };
                let values = if matches!(self, Domain::LogUniform { .. }) {
                    spaced(low.ln(), high.ln(), *steps)
                        .into_iter()
                        .map(|exponent| exponent.exp().clamp(*low, *high))
                        .collect()
                } else {
                    spaced(*low, *high, *steps)
                };
                values.into_iter().map(|value| (Value::Float(value), None)).collect()
            }
            Domain::Int { low, high } => {
                if (high - low) as usize >= GRID_POINTS_MAX {
                    return refuse(format!(
                        "the grid has more than {GRID_POINTS_MAX} points; '{name}' alone has {}",
                        high - low + 1
                    ));
                }
                (*low..=*high).map(|value| (Value::Int(value), None)).collect()
            }
            Domain::Choice(alternatives) => alternatives
                .iter()
                .map(|alternative| {
                    let nested = (!alternative.space.params.is_empty()).then_some(&alternative.space);
                    (alternative.value.clone(), nested)
                })
                .collect(),
        })
    }
}

/// A range `[low, high]` of numbers, `low < high`.
fn bounds(path: &str, kind: &str, value: &toml::Value) -> Result<(f64, f64), SweepError> {
    let number = |value: &toml::Value| match value {
        toml::Value::Integer(value) => Some(*value as f64),
        toml::Value::Float(value) if value.is_finite() => Some(*value),
        _ => None,
    };
    let range = match value {
        toml::Value::Array(items) if items.len() == 2 => number(&items[0]).zip(number(&items[1])),
        _ => None,
    };
    let Some((low, high)) = range else {
        return refuse(format!(
            "'{path}.{kind}' is {value}; expected [LOW, HIGH], two finite numbers"
        ));
    };
    if low >= high {
        return refuse(format!(
            "'{path}': the range [{low}, {high}] is empty; expected low < high"
        ));
    }
    Ok((low, high))
}

/// Whether the metric is better larger or smaller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Minimize,
    Maximize,
}

impl Direction {
    /// The value as a loss: smaller is better.
    pub fn loss(self, value: f64) -> f64 {
        match self {
            Direction::Minimize => value,
            Direction::Maximize => -value,
        }
    }
}

/// A finished trial, as searchers learn from it: its parameters and its metric (none when it failed or
/// reported nothing usable).
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub params: Params,
    pub value: Option<f64>,
}

/// How trials' parameters are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Searcher {
    Grid,
    Random,
    Tpe,
}

/// How TPE suggests. [`TpeSettings::KILN`] is what sweeps use; [`TpeSettings::OPTUNA`] is Optuna's
/// default `TPESampler`, which `kiln bench tpe` and the searcher tests compare against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeSettings {
    /// Random trials before TPE models anything.
    pub startup_trials: usize,
    /// Candidates drawn from the good density and scored, for each suggestion.
    pub candidates: usize,
    /// The fraction of the trials so far (at most 25) that make the good density.
    pub good_fraction: f64,
    /// Every kernel's width on a real axis (its larger gap to its neighbours, and the floor it is clipped
    /// to) times this; 1 is Optuna's rule.
    pub width_scale: f64,
    /// How much more the better trials of the good group weigh: the one ranked `r` (0 the best) of `k`
    /// counts `((k - r) / k)^rank_power` times its usual weight. 0 weighs them alike, as Optuna does.
    pub rank_power: f64,
}

impl TpeSettings {
    /// Optuna 5's defaults: 10 random startup trials, 24 candidates, the best 10%, its bandwidths.
    pub const OPTUNA: TpeSettings = TpeSettings {
        startup_trials: 10,
        candidates: 24,
        good_fraction: 0.1,
        width_scale: 1.0,
        rank_power: 0.0,
    };

    /// Kiln's, chosen on held-out seeds (100–299, then checked on 300–499) of Branin and Hartmann-6 by
    /// `cargo test -p kiln-coordinator --lib tpe_settings -- --ignored --nocapture` (benches/RESULTS.md):
    /// the good density leans on the best of its trials (rank power 2) instead of weighing them alike, so
    /// its kernels can be narrower (0.6) and its group larger (20%) without settling in the first basin
    /// found; 6 random trials before it are enough to start from.
    pub const KILN: TpeSettings = TpeSettings {
        startup_trials: 6,
        candidates: 64,
        good_fraction: 0.2,
        width_scale: 0.6,
        rank_power: 2.0,
    };
}

/// The random stream of trial `trial` of a sweep seeded `seed`: the same trial always draws the same.
fn trial_rng(seed: u64, trial: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ trial.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

impl Searcher {
    /// The parameters of trial number `trial` (0-based), given what finished so far; `None` when a grid
    /// is exhausted.
    pub fn suggest(
        self,
        space: &Space,
        seed: u64,
        trial: u64,
        direction: Direction,
        history: &[Observation],
    ) -> Result<Option<Params>, SweepError> {
        match self {
            Searcher::Grid => Ok(space.grid()?.into_iter().nth(trial as usize)),
            Searcher::Random => Ok(Some(space.sample(&mut trial_rng(seed, trial)))),
            Searcher::Tpe => Ok(Some(suggest_tpe(
                &TpeSettings::KILN,
                space,
                seed,
                trial,
                direction,
                history,
            ))),
        }
    }
}

/// TPE's parameters for trial `trial` of a sweep seeded `seed`, given what finished so far.
pub fn suggest_tpe(
    settings: &TpeSettings,
    space: &Space,
    seed: u64,
    trial: u64,
    direction: Direction,
    history: &[Observation],
) -> Params {
    let mut rng = trial_rng(seed, trial);
    let observed: Vec<(&Params, f64)> = history
        .iter()
        .filter_map(|observation| {
            let value = observation.value.filter(|value| value.is_finite())?;
            Some((&observation.params, direction.loss(value)))
        })
        .collect();
    if observed.len() < settings.startup_trials {
        return space.sample(&mut rng);
    }
    tpe(settings, space, &observed, &mut rng)
}

/// One TPE suggestion from `observed` (parameters and losses, smaller better, in trial order).
fn tpe(settings: &TpeSettings, space: &Space, observed: &[(&Params, f64)], rng: &mut StdRng) -> Params {
    let mut order: Vec<usize> = (0..observed.len()).collect();
    order.sort_by(|a, b| observed[*a].1.total_cmp(&observed[*b].1).then(a.cmp(b)));
    let good_count = (observed.len() as f64 * settings.good_fraction).ceil().clamp(1.0, 25.0) as usize;
    let (good, bad) = order.split_at(good_count);
    // Each group in trial order, which the estimator's weights follow (older ones count less), each trial
    // with the factor its rank in the group gives its weight (the good group's best count more).
    let group = |indices: &[usize], rank_power: f64| -> Vec<(&Params, f64)> {
        let count = indices.len() as f64;
        let mut ranked: Vec<(usize, f64)> = indices
            .iter()
            .enumerate()
            .map(|(rank, index)| (*index, ((count - rank as f64) / count).powf(rank_power)))
            .collect();
        ranked.sort_unstable_by_key(|(index, _)| *index);
        ranked
            .into_iter()
            .map(|(index, factor)| (observed[index].0, factor))
            .collect()
    };
    let mut params = Params::new();
    tpe_space(
        settings,
        space,
        &group(good, settings.rank_power),
        &group(bad, 0.0),
        rng,
        &mut params,
    );
    params
}

/// How TPE models one parameter: a real interval (log-uniform ones in log space, integers widened by half a
/// step each side and rounded at the end), or the index of a choice.
#[derive(Clone, Copy)]
enum Axis {
    Real {
        low: f64,
        high: f64,
        log: bool,
        integer: bool,
    },
    Choice(usize),
}

impl Axis {
    fn of(domain: &Domain) -> Axis {
        match domain {
            Domain::Uniform { low, high, .. } => Axis::Real {
                low: *low,
                high: *high,
                log: false,
                integer: false,
            },
            Domain::LogUniform { low, high, .. } => Axis::Real {
                low: low.ln(),
                high: high.ln(),
                log: true,
                integer: false,
            },
            Domain::Int { low, high } => Axis::Real {
                low: *low as f64 - 0.5,
                high: *high as f64 + 0.5,
                log: false,
                integer: true,
            },
            Domain::Choice(alternatives) => Axis::Choice(alternatives.len()),
        }
    }

    /// A value as the model sees it; `None` when it is not in the domain.
    fn internal(&self, domain: &Domain, value: &Value) -> Option<f64> {
        match (self, domain) {
            (Axis::Choice(_), Domain::Choice(alternatives)) => alternatives
                .iter()
                .position(|alternative| alternative.value == *value)
                .map(|index| index as f64),
            (Axis::Real { low, high, log, .. }, _) => {
                let value = value.as_f64()?;
                let value = if *log { value.ln() } else { value };
                value.is_finite().then(|| value.clamp(*low, *high))
            }
            _ => None,
        }
    }

    fn external(&self, domain: &Domain, internal: f64) -> Value {
        match (self, domain) {
            (Axis::Choice(_), Domain::Choice(alternatives)) => alternatives[internal as usize].value.clone(),
            (
                Axis::Real {
                    low,
                    high,
                    log,
                    integer,
                },
                _,
            ) => {
                if *integer {
                    Value::Int(internal.round().clamp(low + 0.5, high - 0.5) as i64)
                } else if *log {
                    Value::Float(internal.exp().clamp(low.exp(), high.exp()))
                } else {
                    Value::Float(internal.clamp(*low, *high))
                }
            }
            _ => unreachable!("an axis is made from its domain"),
        }
    }
}

/// TPE over one level of the space, jointly (the multivariate TPE Optuna uses by default): a candidate is
/// drawn whole from one kernel of the good density and scored by the ratio of the two densities at it.
/// A nested choice's space is modelled next, from the trials that picked the same alternative.
fn tpe_space(
    settings: &TpeSettings,
    space: &Space,
    good: &[(&Params, f64)],
    bad: &[(&Params, f64)],
    rng: &mut StdRng,
    params: &mut Params,
) {
    let names: Vec<&String> = space.params.keys().collect();
    let domains: Vec<&Domain> = space.params.values().collect();
    let axes: Vec<Axis> = domains.iter().map(|domain| Axis::of(domain)).collect();
    // Trials missing a parameter of this level (none should) are left out of it.
    let internal = |group: &[(&Params, f64)]| -> Vec<(Vec<f64>, f64)> {
        group
            .iter()
            .filter_map(|(params, factor)| {
                let point = names
                    .iter()
                    .zip(&domains)
                    .zip(&axes)
                    .map(|((name, domain), axis)| axis.internal(domain, params.get(*name)?))
                    .collect::<Option<Vec<f64>>>()?;
                Some((point, *factor))
            })
            .collect()
    };
    let l = Parzen::new(&axes, &internal(good), settings.width_scale);
    let g = Parzen::new(&axes, &internal(bad), settings.width_scale);
    let mut best: (f64, Vec<f64>) = (f64::NEG_INFINITY, Vec::new());
    for _ in 0..settings.candidates {
        let candidate = l.sample(rng);
        let score = l.log_density(&candidate) - g.log_density(&candidate);
        if score > best.0 || best.1.is_empty() {
            best = (score, candidate);
        }
    }
    for (index, ((name, domain), axis)) in names.iter().zip(&domains).zip(&axes).enumerate() {
        let value = axis.external(domain, best.1[index]);
        if let Domain::Choice(alternatives) = domain
            && let Some(picked) = alternatives.iter().find(|alternative| alternative.value == value)
            && !picked.space.params.is_empty()
        {
            let (good, bad) = (picking(good, name, &value), picking(bad, name, &value));
            tpe_space(settings, &picked.space, &good, &bad, rng, params);
        }
        params.insert((*name).clone(), value);
    }
}

/// The trials of `group` whose `name` is `value`.
fn picking<'a>(group: &[(&'a Params, f64)], name: &str, value: &Value) -> Vec<(&'a Params, f64)> {
    group
        .iter()
        .copied()
        .filter(|(params, _)| params.get(name) == Some(value))
        .collect()
}

fn pick_weighted(weights: &[f64], rng: &mut StdRng) -> usize {
    let mut draw = rng.random_range(0.0..1.0) * weights.iter().sum::<f64>();
    for (index, weight) in weights.iter().enumerate() {
        if draw < *weight {
            return index;
        }
        draw -= weight;
    }
    weights.len() - 1
}

/// One axis of a Parzen estimator: per kernel, a normal truncated to the interval, or a distribution over
/// the choices.
enum Kernels {
    Real {
        means: Vec<f64>,
        widths: Vec<f64>,
        /// Per kernel, the log of its normalizer: width · √(2π) · its mass inside [low, high].
        log_norms: Vec<f64>,
        low: f64,
        high: f64,
    },
    Choice(Vec<Vec<f64>>),
}

/// A Parzen estimator over the axes of one level: a kernel per observation and a prior kernel (the centre
/// and the whole range, or every choice alike), weighted as Optuna weighs them (equally, until more than
/// 25 observations make the older ones count less; the prior as one observation), each observation's
/// weight then times its factor (its rank's, in the good density). A kernel's width on a
/// real axis is the larger gap to its neighbours along that axis (the outermost ones use their inner
/// gap), clipped to [range / min(100, n + 2), range].
struct Parzen {
    weights: Vec<f64>,
    axes: Vec<Kernels>,
}

impl Parzen {
    /// From each observation's point (one value per axis) and the factor on its weight.
    fn new(axes: &[Axis], observations: &[(Vec<f64>, f64)], width_scale: f64) -> Parzen {
        let count = observations.len();
        let mut weights: Vec<f64> = if count < 25 {
            vec![1.0; count]
        } else {
            // Optuna's ramp: the oldest count - 25 from 1/count up to 1, then the 25 newest at 1.
            let ramp = count - 25;
            (0..ramp)
                .map(|index| {
                    let start = 1.0 / count as f64;
                    if ramp == 1 {
                        start
                    } else {
                        start + (1.0 - start) * index as f64 / (ramp - 1) as f64
                    }
                })
                .chain(std::iter::repeat_n(1.0, 25))
                .collect()
        };
        for (weight, (_, factor)) in weights.iter_mut().zip(observations) {
            *weight *= factor;
        }
        weights.push(1.0);
        let total: f64 = weights.iter().sum();
        weights.iter_mut().for_each(|weight| *weight /= total);
        let axes = axes
            .iter()
            .enumerate()
            .map(|(index, axis)| {
                let values: Vec<f64> = observations.iter().map(|(point, _)| point[index]).collect();
                match *axis {
                    Axis::Real { low, high, .. } => {
                        let mut means = values.clone();
                        let mut widths = bandwidths(&values, low, high);
                        widths.iter_mut().for_each(|width| *width *= width_scale);
                        means.push((low + high) / 2.0);
                        widths.push(high - low);
                        let log_norms = means
                            .iter()
                            .zip(&widths)
                            .map(|(mean, width)| {
                                let mass = normal_cdf((high - mean) / width) - normal_cdf((low - mean) / width);
                                (width * std::f64::consts::TAU.sqrt() * mass.max(1e-12)).ln()
                            })
                            .collect();
                        Kernels::Real {
                            means,
                            widths,
                            log_norms,
                            low,
                            high,
                        }
                    }
                    Axis::Choice(choices) => {
                        let kernels = count + 1;
                        let prior = 1.0 / kernels as f64;
                        let mut rows: Vec<Vec<f64>> = values
                            .iter()
                            .map(|value| {
                                let mut row = vec![prior; choices];
                                row[*value as usize] += 1.0;
                                let sum: f64 = row.iter().sum();
                                row.into_iter().map(|weight| weight / sum).collect()
                            })
                            .collect();
                        rows.push(vec![1.0 / choices as f64; choices]);
                        Kernels::Choice(rows)
                    }
                }
            })
            .collect();
        Parzen { weights, axes }
    }

    fn sample(&self, rng: &mut StdRng) -> Vec<f64> {
        let kernel = pick_weighted(&self.weights, rng);
        self.axes
            .iter()
            .map(|axis| match axis {
                Kernels::Real {
                    means,
                    widths,
                    low,
                    high,
                    ..
                } => truncated_normal(means[kernel], widths[kernel], *low, *high, rng),
                Kernels::Choice(rows) => pick_weighted(&rows[kernel], rng) as f64,
            })
            .collect()
    }

    fn log_density(&self, x: &[f64]) -> f64 {
        let terms: Vec<f64> = (0..self.weights.len())
            .map(|kernel| {
                let mut log = self.weights[kernel].ln();
                for (axis, value) in self.axes.iter().zip(x) {
                    log += match axis {
                        Kernels::Real {
                            means,
                            widths,
                            log_norms,
                            ..
                        } => {
                            let z = (value - means[kernel]) / widths[kernel];
                            -0.5 * z * z - log_norms[kernel]
                        }
                        Kernels::Choice(rows) => rows[kernel][*value as usize].max(1e-300).ln(),
                    };
                }
                log
            })
            .collect();
        let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !max.is_finite() {
            return max;
        }
        max + terms.iter().map(|term| (term - max).exp()).sum::<f64>().ln()
    }
}

/// Each observation's kernel width on a real axis (see [`Parzen`]).
fn bandwidths(values: &[f64], low: f64, high: f64) -> Vec<f64> {
    let count = values.len();
    let mut order: Vec<usize> = (0..count).collect();
    order.sort_by(|a, b| values[*a].total_cmp(&values[*b]));
    let sorted: Vec<f64> = std::iter::once(low)
        .chain(order.iter().map(|index| values[*index]))
        .chain(std::iter::once(high))
        .collect();
    let mut widths_sorted: Vec<f64> = (1..=count)
        .map(|index| (sorted[index] - sorted[index - 1]).max(sorted[index + 1] - sorted[index]))
        .collect();
    if count >= 2 {
        widths_sorted[0] = sorted[2] - sorted[1];
        widths_sorted[count - 1] = sorted[count] - sorted[count - 1];
    }
    let range = high - low;
    let min_width = range / 100.0f64.min(2.0 + count as f64);
    let mut widths = vec![0.0; count];
    for (rank, index) in order.iter().enumerate() {
        widths[*index] = widths_sorted[rank].clamp(min_width, range);
    }
    widths
}

/// A draw from the normal (mean, width) truncated to [low, high]: rejection, then the nearest bound.
fn truncated_normal(mean: f64, width: f64, low: f64, high: f64, rng: &mut StdRng) -> f64 {
    for _ in 0..64 {
        // Box–Muller: a standard normal from two uniforms.
        let (u, v): (f64, f64) = (rng.random_range(f64::EPSILON..1.0), rng.random_range(0.0..1.0));
        let value = mean + width * (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
        if (low..=high).contains(&value) {
            return value;
        }
    }
    mean.clamp(low, high)
}

fn normal_cdf(z: f64) -> f64 {
    0.5 * (1.0 + libm::erf(z / std::f64::consts::SQRT_2))
}

/// What a scheduler answers to a trial's intermediate result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    Continue,
    /// Stop the trial: it is not in the best `1/eta` at its rung.
    Stop,
}

/// Asynchronous successive halving over one bracket of rungs.
#[derive(Debug, Clone, PartialEq)]
pub struct Bracket {
    /// The resource (epochs, say) at each rung, smallest first, all below the maximum.
    pub rungs: Vec<u64>,
    /// The values recorded at each rung, as losses (smaller better).
    recorded: Vec<Vec<f64>>,
    eta: u64,
}

impl Bracket {
    /// Rungs at `min_resource · eta^k` below `max_resource`.
    pub fn new(min_resource: u64, max_resource: u64, eta: u64) -> Result<Bracket, SweepError> {
        if eta < 2 {
            return refuse(format!("eta is {eta}; expected 2 or more"));
        }
        if min_resource == 0 || min_resource >= max_resource {
            return refuse(format!(
                "the resource range [{min_resource}, {max_resource}] is empty; expected 0 < min_resource < max_resource"
            ));
        }
        let mut rungs = Vec::new();
        let mut rung = min_resource;
        while rung < max_resource {
            rungs.push(rung);
            rung = rung.saturating_mul(eta);
        }
        let recorded = vec![Vec::new(); rungs.len()];
        Ok(Bracket { rungs, recorded, eta })
    }

    /// Records a trial's value after `resource` units; at a rung it decides whether the trial goes on.
    /// Between rungs, and past the last, trials continue.
    pub fn on_result(&mut self, resource: u64, loss: f64) -> Decision {
        let Some(rung) = self.rungs.iter().position(|rung| *rung == resource) else {
            return Decision::Continue;
        };
        let loss = if loss.is_nan() { f64::INFINITY } else { loss };
        let recorded = &mut self.recorded[rung];
        recorded.push(loss);
        // The trial goes on if it is among the best ceil(n / eta) recorded here.
        let mut sorted = recorded.clone();
        sorted.sort_by(f64::total_cmp);
        let keep = sorted.len().div_ceil(self.eta as usize).max(1);
        if loss <= sorted[keep - 1] {
            Decision::Continue
        } else {
            Decision::Stop
        }
    }
}

/// Early stopping across trials: ASHA is one bracket, Hyperband several whose first rungs grow by `eta`.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduler {
    pub brackets: Vec<Bracket>,
    /// Each bracket's share of trials (the aggressive brackets get more).
    weights: Vec<f64>,
    /// Trials assigned to each bracket so far.
    assigned: Vec<u64>,
}

impl Scheduler {
    pub fn asha(min_resource: u64, max_resource: u64, eta: u64) -> Result<Scheduler, SweepError> {
        Ok(Scheduler {
            brackets: vec![Bracket::new(min_resource, max_resource, eta)?],
            weights: vec![1.0],
            assigned: vec![0],
        })
    }

    /// Hyperband's brackets: bracket `s` starts at `min_resource · eta^s`, for every `s` whose first rung
    /// is below `max_resource`; trials are spread in proportion to `eta^(S-1-s) / (S - s)` as in the
    /// paper's allocation (more configurations where more are stopped early).
    pub fn hyperband(min_resource: u64, max_resource: u64, eta: u64) -> Result<Scheduler, SweepError> {
        let mut brackets = Vec::new();
        let mut first = min_resource;
        loop {
            brackets.push(Bracket::new(first, max_resource, eta)?);
            first = first.saturating_mul(eta);
            if first >= max_resource {
                break;
            }
        }
        let count = brackets.len();
        let weights = (0..count)
            .map(|s| (eta as f64).powi((count - 1 - s) as i32) / (count - s) as f64)
            .collect();
        Ok(Scheduler {
            brackets,
            weights,
            assigned: vec![0; count],
        })
    }

    /// The bracket of the next trial: the one furthest behind its share.
    pub fn assign(&mut self) -> usize {
        let total: f64 = self.weights.iter().sum();
        let bracket = (0..self.brackets.len())
            .min_by(|a, b| {
                let behind = |index: usize| (self.assigned[index] + 1) as f64 / (self.weights[index] / total);
                behind(*a).total_cmp(&behind(*b)).then(a.cmp(b))
            })
            .unwrap_or(0);
        self.assigned[bracket] += 1;
        bracket
    }

    pub fn on_result(&mut self, bracket: usize, resource: u64, loss: f64) -> Decision {
        match self.brackets.get_mut(bracket) {
            Some(bracket) => bracket.on_result(resource, loss),
            None => Decision::Continue,
        }
    }
}

/// How a sweep picks and stops trials: a searcher alone, or random search under an early-stopping
/// scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    Grid,
    Random,
    Tpe,
    Asha,
    Hyperband,
}

impl Algorithm {
    pub fn searcher(self) -> Searcher {
        match self {
            Algorithm::Grid => Searcher::Grid,
            Algorithm::Tpe => Searcher::Tpe,
            Algorithm::Random | Algorithm::Asha | Algorithm::Hyperband => Searcher::Random,
        }
    }

    pub fn stops_early(self) -> bool {
        matches!(self, Algorithm::Asha | Algorithm::Hyperband)
    }
}

/// The `[sweep]` table of a sweep job.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSweep {
    algorithm: Algorithm,
    metric: String,
    direction: Direction,
    max_trials: u32,
    #[serde(default = "one")]
    parallel: u32,
    #[serde(default)]
    seed: u64,
    min_resource: Option<u64>,
    max_resource: Option<u64>,
    #[serde(default = "three")]
    eta: u64,
    register: Option<String>,
    alias: Option<String>,
}

fn one() -> u32 {
    1
}

fn three() -> u64 {
    3
}

/// Most trials one sweep may run.
pub const TRIALS_MAX: u32 = 10_000;

/// A sweep as submitted (`kind = "sweep"`): what to search, how, and the job each trial runs.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepSpec {
    pub name: String,
    pub algorithm: Algorithm,
    /// The metric trials report (through Kiln's metrics or the MLflow API), and which way is better.
    pub metric: String,
    pub direction: Direction,
    pub max_trials: u32,
    /// Trials running at once at most.
    pub parallel: u32,
    pub seed: u64,
    /// ASHA and Hyperband: the resource (the step of the metric: epochs for train trials) of the first
    /// rung and of a whole trial, and the reduction factor.
    pub min_resource: u64,
    pub max_resource: u64,
    pub eta: u64,
    /// Register the best trial's model under this name with `alias` when the sweep ends.
    pub register: Option<String>,
    pub alias: String,
    pub space: Space,
    /// The job every trial runs (`kind = "train"` or `"command"`), before its parameters are filled in.
    pub template: toml::Table,
}

/// Keys of a train job's `[train]` section a parameter may set; any other parameter reaches the trial
/// only through its environment.
pub const TRAIN_KEYS: [&str; 7] = [
    "learning_rate",
    "batch_size",
    "epochs",
    "optimizer",
    "momentum",
    "weight_decay",
    "validation_fraction",
];

impl SweepSpec {
    /// Parses and checks a sweep job's TOML: its `[sweep]` settings, its `[space]` and its `[template]`,
    /// which must make a valid job for every kind of point (checked on one sampled point).
    pub fn parse(text: &str) -> Result<SweepSpec, SweepError> {
        let spec = SweepSpec::read(text)?;
        spec.check()?;
        Ok(spec)
    }

    /// Reads a sweep that [`SweepSpec::parse`] accepted when it was submitted (the controller, the CLI and
    /// the dashboard read stored sweeps often): its settings and space, without enumerating a grid or
    /// building a sample trial again.
    pub fn read(text: &str) -> Result<SweepSpec, SweepError> {
        let table: toml::Table = text
            .parse()
            .map_err(|error: toml::de::Error| SweepError(error.message().to_string()))?;
        let name = table
            .get("name")
            .and_then(toml::Value::as_str)
            .unwrap_or_default()
            .to_string();
        let section = |key: &str, example: &str| -> Result<toml::Table, SweepError> {
            match table.get(key) {
                Some(toml::Value::Table(section)) => Ok(section.clone()),
                Some(other) => refuse(format!("[{key}] is {}, expected a table", other.type_str())),
                None => refuse(format!(
                    "section [{key}] is missing; a sweep needs it, for example {example}"
                )),
            }
        };
        let raw: RawSweep = toml::Value::Table(section(
            "sweep",
            "[sweep] algorithm = \"tpe\", metric = \"validation_accuracy\", direction = \"maximize\", max_trials = 20",
        )?)
        .try_into()
        .map_err(|error: toml::de::Error| SweepError(format!("[sweep]: {}", error.message())))?;
        for key in table.keys() {
            if !["name", "kind", "sweep", "space", "template"].contains(&key.as_str()) {
                return refuse(format!(
                    "unknown key '{key}' in a sweep; expected name, kind, [sweep], [space] and [template]"
                ));
            }
        }
        let space = Space::from_toml(&section(
            "space",
            "[space] learning_rate = { log_uniform = [1e-4, 1e-1] }",
        )?)?;
        let template = section("template", "[template] kind = \"train\" with its [template.train]")?;
        if raw.max_trials == 0 || raw.max_trials > TRIALS_MAX {
            return refuse(format!(
                "sweep.max_trials is {}; expected 1 to {TRIALS_MAX}",
                raw.max_trials
            ));
        }
        if raw.parallel == 0 {
            return refuse("sweep.parallel is 0; expected at least 1 trial at a time");
        }
        if raw.metric.trim().is_empty() {
            return refuse("sweep.metric is empty; expected the metric trials report, such as validation_accuracy");
        }
        let (min_resource, max_resource) = match (raw.algorithm.stops_early(), raw.min_resource, raw.max_resource) {
            (true, Some(min), Some(max)) => (min, max),
            (true, _, _) => {
                return refuse(format!(
                    "sweep.algorithm {:?} stops trials early and needs sweep.min_resource and sweep.max_resource (epochs, for train trials)",
                    raw.algorithm
                ));
            }
            (false, _, _) => (1, 2),
        };
        if raw.algorithm.stops_early() {
            Bracket::new(min_resource, max_resource, raw.eta).map_err(|error| SweepError(format!("sweep: {error}")))?;
        }
        Ok(SweepSpec {
            name,
            algorithm: raw.algorithm,
            metric: raw.metric,
            direction: raw.direction,
            max_trials: raw.max_trials,
            parallel: raw.parallel,
            seed: raw.seed,
            min_resource,
            max_resource,
            eta: raw.eta,
            register: raw.register.filter(|name| !name.trim().is_empty()),
            alias: raw.alias.unwrap_or_else(|| "champion".into()),
            space,
            template,
        })
    }

    /// What only submission needs checking: a grid that can be enumerated, a template of a kind trials can
    /// be, and a valid trial job made from it (on one sampled point).
    fn check(&self) -> Result<(), SweepError> {
        if self.algorithm == Algorithm::Grid {
            self.space.grid()?;
        }
        let kind = self.template.get("kind").and_then(toml::Value::as_str);
        if !matches!(kind, Some("train" | "command")) {
            return refuse(format!(
                "template.kind is {kind:?}; expected \"train\" or \"command\" (a trial is one such job)"
            ));
        }
        if self.register.is_some() && kind != Some("train") {
            return refuse("sweep.register needs a train template: only train trials make a model to register");
        }
        let sample = self.space.sample(&mut trial_rng(self.seed, 0));
        crate::spec::parse_job_spec("the sweep's template", &self.trial_spec(0, 0, &sample))
            .map_err(|error| SweepError(format!("the template does not make a valid trial: {}", error.message)))?;
        Ok(())
    }

    /// The TOML of trial `trial` of sweep job `sweep`: the template named `SWEEP-tN`, its parameters in
    /// its environment (`KILN_TRIAL_PARAMS` as JSON and `KILN_PARAM_NAME` each) and, for a train trial,
    /// in its `[train]` section where the key is one the trainer knows. Early-stopping sweeps train for
    /// `max_resource` epochs.
    pub fn trial_spec(&self, sweep: u64, trial: u64, params: &Params) -> String {
        let mut template = self.template.clone();
        template.insert("name".into(), toml::Value::String(format!("{}-t{trial}", self.name)));
        let env = template
            .entry("env")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let toml::Value::Table(env) = env {
            env.insert("KILN_SWEEP".into(), toml::Value::String(sweep.to_string()));
            env.insert("KILN_TRIAL".into(), toml::Value::String(trial.to_string()));
            let json = serde_json::to_string(params).unwrap_or_default();
            env.insert("KILN_TRIAL_PARAMS".into(), toml::Value::String(json));
            for (name, value) in params {
                let key = format!(
                    "KILN_PARAM_{}",
                    name.to_ascii_uppercase()
                        .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
                );
                env.insert(key, toml::Value::String(value.to_string()));
            }
        }
        if let Some(toml::Value::Table(train)) = template.get_mut("train") {
            // The sweep registers its best trial's model; trials register nothing themselves.
            train.remove("register");
            for (name, value) in params {
                if TRAIN_KEYS.contains(&name.as_str()) {
                    let value = match value {
                        Value::Bool(value) => toml::Value::Boolean(*value),
                        Value::Int(value) => toml::Value::Integer(*value),
                        Value::Float(value) => toml::Value::Float(*value),
                        Value::Text(value) => toml::Value::String(value.clone()),
                    };
                    train.insert(name.clone(), value);
                }
            }
            if self.algorithm.stops_early() {
                train.insert("epochs".into(), toml::Value::Integer(self.max_resource as i64));
            }
        }
        toml::to_string(&template).unwrap_or_default()
    }
}

/// The environment variables that make a job a trial: its sweep's job id and its number.
pub const SWEEP_ENV: &str = "KILN_SWEEP";
pub const TRIAL_ENV: &str = "KILN_TRIAL";
pub const PARAMS_ENV: &str = "KILN_TRIAL_PARAMS";

/// The sweep and trial number a job's spec says it belongs to.
pub fn trial_of(spec: &crate::spec::JobSpec) -> Option<(u64, u64)> {
    let sweep = spec.env.get(SWEEP_ENV)?.parse().ok()?;
    let trial = spec.env.get(TRIAL_ENV)?.parse().ok()?;
    Some((sweep, trial))
}

/// A trial's parameters as its run records them (text, like every MLflow param).
pub fn trial_params(spec: &crate::spec::JobSpec) -> Vec<(String, String)> {
    spec.env
        .get(PARAMS_ENV)
        .and_then(|json| serde_json::from_str::<Params>(json).ok())
        .map(|params| {
            params
                .into_iter()
                .map(|(name, value)| (name, value.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The experiment a sweep's trial runs go to.
pub fn experiment_name(sweep: u64, name: &str) -> String {
    format!("sweep-{sweep}-{name}")
}

/// The best trial's model, to register when its sweep ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub name: String,
    pub alias: String,
    pub run_id: String,
    /// The model's artifact location (`mlflow-artifacts:/EXPERIMENT/RUN/artifacts/model`).
    pub source: String,
    pub description: String,
}

/// Registers `registration`'s model as the next version of its name (made if missing) and points the alias
/// at it; answers the version. Part of applying a sweep's end, so deterministic.
pub fn register_best(
    tracking: &mut crate::tracking::Tracking,
    registration: &Registration,
    now_ms: i64,
) -> Result<u64, String> {
    use crate::registry::{RegistryCommand, RegistryOutcome};
    use crate::tracking::{PROXIED_ARTIFACT_ROOT, TrackingCommand, TrackingOutcome};
    let register = |command| TrackingCommand::Register {
        command,
        user_id: "kiln".into(),
        artifact_root: PROXIED_ARTIFACT_ROOT.into(),
    };
    // The name may be registered already (an earlier sweep, a train job); that is fine.
    let _ = tracking.apply(
        register(RegistryCommand::CreateModel {
            name: registration.name.clone(),
            description: String::new(),
            tags: Vec::new(),
        }),
        now_ms,
    );
    let created = tracking
        .apply(
            register(RegistryCommand::CreateVersion {
                name: registration.name.clone(),
                source: registration.source.clone(),
                run_id: registration.run_id.clone(),
                run_link: String::new(),
                description: registration.description.clone(),
                tags: Vec::new(),
            }),
            now_ms,
        )
        .map_err(|error| error.message)?;
    let TrackingOutcome::Registered(RegistryOutcome::Version(version, _)) = created else {
        return Err("registering the version answered no version".into());
    };
    tracking
        .apply(
            register(RegistryCommand::SetAlias {
                name: registration.name.clone(),
                alias: registration.alias.clone(),
                version: version.version,
            }),
            now_ms,
        )
        .map_err(|error| error.message)?;
    Ok(version.version)
}

pub mod controller;
pub mod objectives;

#[cfg(test)]
mod tests;
