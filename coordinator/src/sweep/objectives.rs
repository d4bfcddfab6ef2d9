//! Known test functions for searchers, with their spaces and minima: what the searcher tests, the sweep
//! tests' `command` trials (`examples/scripts/objective.py` computes the same) and `kiln bench tpe` (against
//! Optuna's TPE) measure regret on.

use super::{Params, Space, SweepError};

/// A function to minimize over a box, with its known minimum.
#[derive(Debug, Clone, Copy)]
pub struct Objective {
    pub name: &'static str,
    /// The space as a sweep's `[space]` table writes it.
    pub space_toml: &'static str,
    pub minimum: f64,
    pub evaluate: fn(&Params) -> f64,
}

impl Objective {
    pub fn space(&self) -> Result<Space, SweepError> {
        let table: toml::Table = self
            .space_toml
            .parse()
            .map_err(|error| SweepError(format!("the space of {}: {error}", self.name)))?;
        Space::from_toml(&table)
    }

    /// How far `value` is above the minimum.
    pub fn regret(&self, value: f64) -> f64 {
        value - self.minimum
    }
}

/// Branin on [-5, 10] × [0, 15]: three global minima of 0.397887.
pub const BRANIN: Objective = Objective {
    name: "branin",
    space_toml: "x = { uniform = [-5.0, 10.0] }\ny = { uniform = [0.0, 15.0] }\n",
    minimum: 0.397887,
    evaluate: branin,
};

/// Hartmann-6 on [0, 1]^6: one global minimum of -3.32237 among six local ones.
pub const HARTMANN6: Objective = Objective {
    name: "hartmann6",
    space_toml: "x0 = { uniform = [0.0, 1.0] }\nx1 = { uniform = [0.0, 1.0] }\nx2 = { uniform = [0.0, 1.0] }\n\
                 x3 = { uniform = [0.0, 1.0] }\nx4 = { uniform = [0.0, 1.0] }\nx5 = { uniform = [0.0, 1.0] }\n",
    minimum: -3.32237,
    evaluate: hartmann6,
};

/// Every known objective, by name.
pub const OBJECTIVES: [Objective; 2] = [BRANIN, HARTMANN6];

fn coordinate(params: &Params, name: &str) -> f64 {
    params.get(name).and_then(|value| value.as_f64()).unwrap_or(f64::NAN)
}

fn branin(params: &Params) -> f64 {
    let (x, y) = (coordinate(params, "x"), coordinate(params, "y"));
    let pi = std::f64::consts::PI;
    let (b, c, t) = (5.1 / (4.0 * pi * pi), 5.0 / pi, 1.0 / (8.0 * pi));
    (y - b * x * x + c * x - 6.0).powi(2) + 10.0 * (1.0 - t) * x.cos() + 10.0
}

fn hartmann6(params: &Params) -> f64 {
    const ALPHA: [f64; 4] = [1.0, 1.2, 3.0, 3.2];
    const A: [[f64; 6]; 4] = [
        [10.0, 3.0, 17.0, 3.5, 1.7, 8.0],
        [0.05, 10.0, 17.0, 0.1, 8.0, 14.0],
        [3.0, 3.5, 1.7, 10.0, 17.0, 8.0],
        [17.0, 8.0, 0.05, 10.0, 0.1, 14.0],
    ];
    const P: [[f64; 6]; 4] = [
        [0.1312, 0.1696, 0.5569, 0.0124, 0.8283, 0.5886],
        [0.2329, 0.4135, 0.8307, 0.3736, 0.1004, 0.9991],
        [0.2348, 0.1451, 0.3522, 0.2883, 0.3047, 0.6650],
        [0.4047, 0.8828, 0.8732, 0.5743, 0.1091, 0.0381],
    ];
    let x: Vec<f64> = (0..6).map(|index| coordinate(params, &format!("x{index}"))).collect();
    -(0..4)
        .map(|i| ALPHA[i] * (-(0..6).map(|j| A[i][j] * (x[j] - P[i][j]).powi(2)).sum::<f64>()).exp())
        .sum::<f64>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::Value;

    fn point(values: &[(&str, f64)]) -> Params {
        values
            .iter()
            .map(|(name, value)| (name.to_string(), Value::Float(*value)))
            .collect()
    }

    #[test]
    fn the_objectives_reach_their_minima_at_the_known_points() {
        let pi = std::f64::consts::PI;
        for (x, y) in [(-pi, 12.275), (pi, 2.275), (9.42478, 2.475)] {
            let value = (BRANIN.evaluate)(&point(&[("x", x), ("y", y)]));
            assert!(BRANIN.regret(value).abs() < 1e-5, "branin({x}, {y}) = {value}");
        }
        let optimum = [0.20169, 0.150011, 0.476874, 0.275332, 0.311652, 0.6573];
        let names: Vec<String> = (0..6).map(|index| format!("x{index}")).collect();
        let params = point(&names.iter().map(String::as_str).zip(optimum).collect::<Vec<_>>());
        let value = (HARTMANN6.evaluate)(&params);
        assert!(
            HARTMANN6.regret(value).abs() < 1e-4,
            "hartmann6 at its optimum = {value}"
        );
        for objective in OBJECTIVES {
            assert!(objective.space().is_ok(), "{}", objective.name);
        }
    }
}
