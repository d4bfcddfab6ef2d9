//! The built-in models.

use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::prelude::*;

/// A multi-layer perceptron for tabular data: inputs → hidden layers with ReLU → outputs.
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

/// A small CNN for images given as flattened rows (channels × height × width, row-major): two 3×3
/// convolutions with ReLU, one 2×2 max-pool, then a hidden dense layer and the outputs.
#[derive(Module, Debug)]
pub struct Cnn {
    first: Conv2d,
    second: Conv2d,
    pool: MaxPool2d,
    hidden: Linear,
    output: Linear,
    activation: Relu,
    channels: usize,
    height: usize,
    width: usize,
}

impl Cnn {
    pub fn new(image: [usize; 3], hidden: usize, outputs: usize, device: &Device) -> Cnn {
        let [channels, height, width] = image;
        let convolution = |from: usize, to: usize| {
            Conv2dConfig::new([from, to], [3, 3])
                .with_padding(PaddingConfig2d::Same)
                .init(device)
        };
        Cnn {
            first: convolution(channels, 16),
            second: convolution(16, 32),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            hidden: LinearConfig::new(32 * (height / 2) * (width / 2), hidden).init(device),
            output: LinearConfig::new(hidden, outputs).init(device),
            activation: Relu::new(),
            channels,
            height,
            width,
        }
    }

    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        let [rows, _] = input.dims();
        let x = input.reshape([rows, self.channels, self.height, self.width]);
        let x = self.activation.forward(self.first.forward(x));
        let x = self.pool.forward(self.activation.forward(self.second.forward(x)));
        let x: Tensor<2> = x.flatten(1, 3);
        self.output.forward(self.activation.forward(self.hidden.forward(x)))
    }
}

/// The model a train job names.
#[derive(Module, Debug)]
pub enum Network {
    Mlp(Mlp),
    Cnn(Cnn),
}

impl Network {
    pub fn forward(&self, input: Tensor<2>) -> Tensor<2> {
        match self {
            Network::Mlp(model) => model.forward(input),
            Network::Cnn(model) => model.forward(input),
        }
    }
}
