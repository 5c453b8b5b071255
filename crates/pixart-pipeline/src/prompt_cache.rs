//! The T5 states of recent prompts, so a repeated prompt (or negative prompt) skips the text
//! encoder.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use candle_core::Tensor;

/// A bounded cache of prompt states, least recently used out first. Zero capacity caches
/// nothing.
#[derive(Debug)]
pub(crate) struct PromptCache {
    states: Option<Mutex<lru::LruCache<String, Tensor>>>,
}

impl PromptCache {
    /// A cache of `capacity` prompts.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { states: NonZeroUsize::new(capacity).map(|n| Mutex::new(lru::LruCache::new(n))) }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, lru::LruCache<String, Tensor>>> {
        self.states.as_ref().map(|m| m.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The states of `text`, if cached (it becomes the most recent).
    pub(crate) fn get(&self, text: &str) -> Option<Tensor> {
        self.lock()?.get(text).cloned()
    }

    /// Keeps the states of `text`.
    pub(crate) fn put(&self, text: &str, states: &Tensor) {
        if let Some(mut cache) = self.lock() {
            cache.put(text.to_string(), states.clone());
        }
    }
}
