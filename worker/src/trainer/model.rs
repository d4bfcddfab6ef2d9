//! The built-in models.

use burn::nn::{Linear, LinearConfig, Relu};
use burn::prelude::*;

/// A multi-layer perceptron for tabular classification: inputs → hidden layers with ReLU → class logits.
#[derive(Module, Debug)]
pub struct Mlp {
    layers: Vec<Linear>,
    activation: Relu,
}

impl Mlp {
    pub fn new(inputs: usize, hidden: &[usize], outputs: usize, device: &Device) -> Mlp {
        let mut widths = vec![inputs];
        widths.extend_from_slice(hidden);
        widths.push(outputs);
        let layers = widths
            .windows(2)
            .map(|pair| LinearConfig::new(pair[0], pair[1]).init(device))
            .collect();
        Mlp {
            layers,
            activation: Relu::new(),
        }
    }

    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let last = self.layers.len() - 1;
        let mut x = input;
        for (index, layer) in self.layers.iter().enumerate() {
            x = layer.forward(x);
            if index < last {
                x = self.activation.forward(x);
            }
        }
        x
    }
}
