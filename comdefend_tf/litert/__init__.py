"""LiteRT (``.tflite``) export of the ComDefend purifier: conversion and op report
(``convert``), the interpreter wrapper (``runtime``) and the BPDA defense (``defense``)."""
