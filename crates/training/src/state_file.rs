//! `trainer_state.json`: what a checkpoint holds beyond weights and optimizer moments (step,
//! data position, generator state, config), written and read the same way by every trainer.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// The file's name inside a checkpoint folder.
pub const FILE_NAME: &str = "trainer_state.json";

/// Why the state file could not be written or read; each trainer wraps it in its own error.
#[derive(Debug)]
pub struct StateFileError {
    /// The state file.
    pub path: String,
    /// What went wrong.
    pub problem: String,
}

impl StateFileError {
    /// A problem found in a file that did read, e.g. a field that does not parse.
    pub fn at(dir: &Path, problem: impl Into<String>) -> Self {
        Self {
            path: dir.join(FILE_NAME).display().to_string(),
            problem: problem.into(),
        }
    }
}

/// Writes `state` as pretty JSON into `dir`.
pub fn write<T: Serialize>(dir: &Path, state: &T) -> Result<(), StateFileError> {
    let text = serde_json::to_string_pretty(state)
        .map_err(|error| StateFileError::at(dir, error.to_string()))?;
    std::fs::write(dir.join(FILE_NAME), text)
        .map_err(|error| StateFileError::at(dir, error.to_string()))
}

/// Reads the state that [`write`] left in `dir`.
pub fn read<T: DeserializeOwned>(dir: &Path) -> Result<T, StateFileError> {
    let text = std::fs::read_to_string(dir.join(FILE_NAME))
        .map_err(|error| StateFileError::at(dir, error.to_string()))?;
    serde_json::from_str(&text).map_err(|error| StateFileError::at(dir, error.to_string()))
}
