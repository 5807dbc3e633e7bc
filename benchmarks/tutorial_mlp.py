"""Trains a simple deep NN on the MNIST dataset: the tutorial this project grew from.

The classic Keras MNIST MLP script as published (784 -> 512 relu -> 256 relu -> 10
softmax, SGD with learning rate 0.01, batch 128, 20 epochs, 20% of the training images held
out for validation), with only the renames Keras 3 needs: `keras.utils.to_categorical` for
`np_utils.to_categorical`, `SGD(learning_rate=...)` for `SGD(lr=...)`, `epochs=` for
`nb_epoch=`. One setting differs: VERBOSE = 2 (one line per epoch, as the train stage
logs) instead of the published 1 (a per-batch progress bar), so neither side pays for a
progress bar. The benchmark (benchmarks/train_speed.py) runs it unchanged: it supplies
`mnist.load_data()` from the local files and times the epochs from outside.
"""

from __future__ import print_function

import numpy as np
from keras.datasets import mnist
from keras.layers import Dense
from keras.models import Sequential
from keras.optimizers import SGD
from keras.utils import to_categorical

np.random.seed(1671)  # for reproducibility

# network and training
NB_EPOCH = 20
BATCH_SIZE = 128
VERBOSE = 2
NB_CLASSES = 10  # number of outputs = number of digits
OPTIMIZER = SGD(learning_rate=0.01)
VALIDATION_SPLIT = 0.2  # how much TRAIN is reserved for VALIDATION

# data: shuffled and split between train and test sets
(X_train, y_train), (X_test, y_test) = mnist.load_data()

# X_train is 60000 rows of 28x28 values --> reshaped in 60000 x 784
RESHAPED = 784
X_train = X_train.reshape(60000, RESHAPED)
X_test = X_test.reshape(10000, RESHAPED)
X_train = X_train.astype("float32")
X_test = X_test.astype("float32")

# normalize
X_train /= 255
X_test /= 255
print(X_train.shape[0], "train samples")
print(X_test.shape[0], "test samples")

# convert class vectors to binary class matrices
Y_train = to_categorical(y_train, NB_CLASSES)
Y_test = to_categorical(y_test, NB_CLASSES)

model = Sequential()
model.add(Dense(512, activation="relu", input_shape=(RESHAPED,)))
model.add(Dense(256, activation="relu"))
model.add(Dense(NB_CLASSES, activation="softmax"))
model.summary()

model.compile(loss="categorical_crossentropy", optimizer=OPTIMIZER, metrics=["accuracy"])

history = model.fit(
    X_train,
    Y_train,
    batch_size=BATCH_SIZE,
    epochs=NB_EPOCH,
    verbose=VERBOSE,
    validation_split=VALIDATION_SPLIT,
)
score = model.evaluate(X_test, Y_test, verbose=VERBOSE)
print("Test score:", score[0])
print("Test accuracy:", score[1])
