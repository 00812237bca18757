"""pickle a trained model and its optimizer, as multiprocessing and some checkpoint tools do."""

import pickle

import torch
from common import finish, mse, train_tiny

model, optimizer, batches, _ = train_tiny("adam", lr=0.01)
with open("model.pkl", "wb") as handle:
    pickle.dump(model, handle)
clone = pickle.loads(pickle.dumps((model, optimizer)))[0]
with torch.no_grad():
    finish(mse(clone, *batches[0]), len(batches))
