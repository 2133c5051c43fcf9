"""Data: the default Fashion-MNIST set in memory, whole-batch loading, and ImageNet-style image folders."""

from delving.data.batches import InMemoryBatches, batch_flip, batch_translate, channel_stats
from delving.data.fashion_mnist import CLASSES, DatasetError, fetch, load_fashion_mnist, locate
from delving.data.imagefolder import (IMAGENET_MEAN, IMAGENET_PCA_EIGVAL, IMAGENET_PCA_EIGVEC, IMAGENET_STD,
                                      EvalTransform, ImageFolderDataset, PCALighting, SkippingDataLoader,
                                      TrainTransform, Unreadable, UnreadableImageWarning, compute_mean,
                                      eval_loader, evaluate_center_crop, evaluate_ten_view, imagefolder_datasets,
                                      load_or_compute_mean, scan, train_loader)

__all__ = ["CLASSES", "DatasetError", "InMemoryBatches", "batch_flip", "batch_translate",
           "channel_stats", "fetch", "load_fashion_mnist", "locate",
           "IMAGENET_MEAN", "IMAGENET_PCA_EIGVAL", "IMAGENET_PCA_EIGVEC", "IMAGENET_STD", "EvalTransform",
           "ImageFolderDataset", "PCALighting", "SkippingDataLoader", "TrainTransform", "Unreadable",
           "UnreadableImageWarning", "compute_mean", "eval_loader", "evaluate_center_crop", "evaluate_ten_view",
           "imagefolder_datasets", "load_or_compute_mean", "scan", "train_loader"]
