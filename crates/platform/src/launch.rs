//! Start-up of a Ferrite process: settings, telemetry, the application, then serve until told
//! to stop. Shared by every service binary and `ferrite up`.

use std::process::ExitCode;

use crate::app::{Application, ServiceModule};
use crate::settings::Settings;
use crate::telemetry;

/// Exit status when the settings are invalid, distinct from a failure while running.
const EXIT_BAD_SETTINGS: u8 = 2;

/// Loads settings from the environment, then builds and runs `modules` until a signal.
pub async fn serve(process: &str, modules: Vec<Box<dyn ServiceModule>>) -> ExitCode {
    serve_with(process, modules, |_| {}).await
}

/// As [`serve`], calling `started` once the application is built and bound, before serving.
pub async fn serve_with(
    process: &str,
    modules: Vec<Box<dyn ServiceModule>>,
    started: impl FnOnce(&Application),
) -> ExitCode {
    let settings = match load_settings(process) {
        Ok(settings) => settings,
        Err(code) => return code,
    };
    let _telemetry = match telemetry::init(&settings.telemetry) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{process}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let application = match Application::build(settings, modules).await {
        Ok(application) => application,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "start-up failed");
            eprintln!("{process}: cannot start: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    started(&application);
    match application.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}

/// Settings from the environment, with the process name as the default service name. Every
/// problem is printed in one message before anything starts.
pub fn load_settings(process: &str) -> Result<Settings, ExitCode> {
    match Settings::from_process_env() {
        Ok(mut settings) => {
            if settings.telemetry.service_name == "ferrite" {
                settings.telemetry.service_name = format!("ferrite-{process}");
            }
            Ok(settings)
        }
        Err(e) => {
            eprintln!("{process}: {e}");
            Err(ExitCode::from(EXIT_BAD_SETTINGS))
        }
    }
}
