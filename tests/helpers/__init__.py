"""Helpers the tests share: synthetic digits, throwaway pipeline repositories, a tiny
tracking store with a champion."""
