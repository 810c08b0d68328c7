//! Follows the worker Jobs through a watch and reports each attempt's end exactly once.
//!
//! The watch (kube's watcher: a list, then a watch from the list's resource version, a fresh
//! list when the server answers 410 Gone) may show one Job many times, and after a re-list it
//! may not show a Job at all because it was deleted while no watch was open. [`Tracker`] turns
//! that stream of sightings into one [`AttemptEnded`] per attempt.

use std::collections::HashSet;
use std::pin::pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use uuid::Uuid;

use super::manifest::{ATTEMPT_LABEL, JOB_ID_LABEL, MANAGED_BY, MANAGED_BY_LABEL, job_name};
use crate::backend::{AttemptEnded, EndedSender};

/// Longest the watch waits for a failed worker's pod before reporting without its detail.
const POD_LOOKUP_TIMEOUT: Duration = Duration::from_secs(10);

/// One attempt, as its Job's labels name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttemptKey {
    pub job_id: Uuid,
    pub attempt: u32,
}

impl AttemptKey {
    /// The attempt a Job runs, from its labels; `None` for a Job that is not a worker's.
    pub fn of(job: &Job) -> Option<Self> {
        let labels = job.metadata.labels.as_ref()?;
        Some(Self {
            job_id: labels.get(JOB_ID_LABEL)?.parse().ok()?,
            attempt: labels.get(ATTEMPT_LABEL)?.parse().ok()?,
        })
    }

    fn ended(self, clean: bool, detail: String) -> AttemptEnded {
        AttemptEnded {
            job_id: self.job_id,
            attempt: self.attempt,
            clean,
            detail,
        }
    }
}

/// Where a Job stands, from its terminal conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Running,
    Complete,
    /// The condition's reason (`DeadlineExceeded`, `BackoffLimitExceeded`, ...) and message.
    Failed(String),
}

impl JobOutcome {
    /// Only `Complete` and `Failed` are terminal; `SuccessCriteriaMet` and `FailureTarget`
    /// come first while the pods are still being terminated.
    pub fn of(job: &Job) -> Self {
        let conditions = job
            .status
            .as_ref()
            .and_then(|status| status.conditions.as_deref())
            .unwrap_or_default();
        for condition in conditions.iter().filter(|c| c.status == "True") {
            match condition.type_.as_str() {
                "Complete" => return Self::Complete,
                "Failed" => {
                    let reason = condition.reason.as_deref().unwrap_or("unknown reason");
                    let detail = match condition.message.as_deref() {
                        Some(message) if !message.is_empty() => format!("{reason}: {message}"),
                        _ => reason.to_owned(),
                    };
                    return Self::Failed(detail);
                }
                _ => {}
            }
        }
        Self::Running
    }
}

/// Attempts started and not yet ended, and those already reported.
#[derive(Debug, Default)]
pub struct Tracker {
    live: HashSet<AttemptKey>,
    /// Reported once; kept until the Job is seen deleted, so later sightings stay silent.
    reported: HashSet<AttemptKey>,
    /// Deleted by the runner's own `stop`.
    stopping: HashSet<AttemptKey>,
}

impl Tracker {
    pub fn running(&self) -> usize {
        self.live.len()
    }

    /// A Job the backend just created. The watch may have seen it end already.
    pub fn is_reported(&self, key: AttemptKey) -> bool {
        self.reported.contains(&key)
    }

    pub fn launched(&mut self, key: AttemptKey) {
        if !self.reported.contains(&key) {
            self.live.insert(key);
        }
    }

    pub fn stopping(&mut self, key: AttemptKey) {
        self.stopping.insert(key);
    }

    /// A Job added or changed; its end when it has just finished.
    pub fn observed(&mut self, key: AttemptKey, outcome: JobOutcome) -> Option<AttemptEnded> {
        if self.reported.contains(&key) {
            return None;
        }
        match outcome {
            JobOutcome::Running => {
                self.live.insert(key);
                None
            }
            JobOutcome::Complete => Some(self.report(key, true, "Kubernetes Job complete".into())),
            JobOutcome::Failed(detail) => {
                Some(self.report(key, false, format!("Kubernetes Job failed: {detail}")))
            }
        }
    }

    /// A Job deleted, by `stop`, its TTL or someone else; its end unless already reported.
    pub fn deleted(&mut self, key: AttemptKey, outcome: JobOutcome) -> Option<AttemptEnded> {
        let ended = match outcome {
            JobOutcome::Running => self.vanished(key),
            finished => self.observed(key, finished),
        };
        // Nothing will show this Job again, so the attempt can be forgotten.
        self.reported.remove(&key);
        self.stopping.remove(&key);
        ended
    }

    /// A running attempt whose Job no longer exists (deleted while no watch was open).
    pub fn vanished(&mut self, key: AttemptKey) -> Option<AttemptEnded> {
        if self.reported.contains(&key) {
            return None;
        }
        let detail = if self.stopping.contains(&key) {
            "Kubernetes Job deleted: stopped by the runner"
        } else {
            "Kubernetes Job deleted before it finished"
        };
        Some(self.report(key, false, detail.into()))
    }

    /// Running attempts a re-list did not show.
    pub fn missing(&self, listed: &HashSet<AttemptKey>) -> Vec<AttemptKey> {
        self.live.difference(listed).copied().collect()
    }

    fn report(&mut self, key: AttemptKey, clean: bool, detail: String) -> AttemptEnded {
        self.live.remove(&key);
        self.reported.insert(key);
        key.ended(clean, detail)
    }
}

/// The tracker behind a lock no `.await` ever holds.
#[derive(Debug, Clone, Default)]
pub struct SharedTracker(Arc<Mutex<Tracker>>);

impl SharedTracker {
    pub fn lock(&self) -> MutexGuard<'_, Tracker> {
        // A panic while holding this lock leaves plain sets behind, still consistent enough
        // to go on counting and reporting.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What the watch loop works with.
pub struct Watch {
    pub jobs: Api<Job>,
    pub pods: Api<Pod>,
    pub tracker: SharedTracker,
    pub ended: EndedSender,
}

impl Watch {
    /// Runs until the runner stops listening for ended attempts.
    pub async fn run(self) {
        let config = watcher::Config::default().labels(&format!("{MANAGED_BY_LABEL}={MANAGED_BY}"));
        let mut events = pin!(watcher::watcher(self.jobs.clone(), config).default_backoff());
        let mut relisted: Option<HashSet<AttemptKey>> = None;

        while let Some(event) = events.next().await {
            let ended = match event {
                Ok(Event::Init) => {
                    relisted = Some(HashSet::new());
                    Vec::new()
                }
                Ok(Event::InitApply(job)) => {
                    if let (Some(listed), Some(key)) = (relisted.as_mut(), AttemptKey::of(&job)) {
                        listed.insert(key);
                    }
                    self.applied(&job).await.into_iter().collect()
                }
                Ok(Event::InitDone) => self.confirm_missing(relisted.take()).await,
                Ok(Event::Apply(job)) => self.applied(&job).await.into_iter().collect(),
                Ok(Event::Delete(job)) => AttemptKey::of(&job)
                    .and_then(|key| self.tracker.lock().deleted(key, JobOutcome::of(&job)))
                    .into_iter()
                    .collect(),
                Err(error) => {
                    // The backoff retries; the watcher re-lists after 410 Gone by itself.
                    tracing::warn!(error = %error, "watch of worker Jobs failed; retrying");
                    Vec::new()
                }
            };
            for attempt_ended in ended {
                tracing::info!(
                    job.id = %attempt_ended.job_id,
                    attempt = attempt_ended.attempt,
                    clean = attempt_ended.clean,
                    detail = %attempt_ended.detail,
                    "worker Job ended"
                );
                if self.ended.send(attempt_ended).is_err() {
                    return;
                }
            }
        }
    }

    async fn applied(&self, job: &Job) -> Option<AttemptEnded> {
        let key = AttemptKey::of(job)?;
        let outcome = JobOutcome::of(job);
        let outcome = match outcome {
            // A Job already reported is seen again after every re-list; its pod is not
            // worth another request.
            JobOutcome::Failed(_) if self.tracker.lock().is_reported(key) => return None,
            JobOutcome::Failed(detail) => {
                JobOutcome::Failed(self.with_pod_detail(key, detail).await)
            }
            other => other,
        };
        self.tracker.lock().observed(key, outcome)
    }

    /// Adds why the worker's container ended (`OOMKilled`, an exit code), which the Job's
    /// condition does not say. Best effort: the pod may already be gone.
    async fn with_pod_detail(&self, key: AttemptKey, detail: String) -> String {
        let selector = format!(
            "batch.kubernetes.io/job-name={}",
            job_name(key.job_id, key.attempt)
        );
        let params = ListParams::default().labels(&selector);
        let listing = self.pods.list(&params);
        // Reports wait on this; a slow API server must not hold them up for long.
        let pods = match tokio::time::timeout(POD_LOOKUP_TIMEOUT, listing).await {
            Ok(Ok(pods)) => pods,
            Ok(Err(error)) => {
                tracing::warn!(job.id = %key.job_id, error = %error, "cannot read the worker's pod");
                return detail;
            }
            Err(_) => {
                tracing::warn!(job.id = %key.job_id, "reading the worker's pod timed out");
                return detail;
            }
        };
        let terminations: Vec<String> = pods
            .items
            .iter()
            .filter_map(|pod| pod.status.as_ref()?.container_statuses.as_ref())
            .flatten()
            .filter_map(|status| {
                let terminated = status.state.as_ref()?.terminated.as_ref()?;
                let reason = terminated.reason.as_deref().unwrap_or("Terminated");
                Some(format!(
                    "container {} {reason} (exit code {})",
                    status.name, terminated.exit_code
                ))
            })
            .collect();
        if terminations.is_empty() {
            detail
        } else {
            format!("{detail}; {}", terminations.join("; "))
        }
    }

    /// After a re-list, a running attempt it did not show may have been deleted while no
    /// watch was open, or created after the list was taken: only a Job that is really gone
    /// has ended.
    async fn confirm_missing(&self, listed: Option<HashSet<AttemptKey>>) -> Vec<AttemptEnded> {
        let Some(listed) = listed else {
            return Vec::new();
        };
        let missing = self.tracker.lock().missing(&listed);
        let mut ended = Vec::new();
        for key in missing {
            match self.jobs.get_opt(&job_name(key.job_id, key.attempt)).await {
                Ok(None) => ended.extend(self.tracker.lock().vanished(key)),
                Ok(Some(_)) => {}
                Err(error) => {
                    // The next re-list asks again.
                    tracing::warn!(job.id = %key.job_id, error = %error, "cannot check a worker Job");
                }
            }
        }
        ended
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::batch::v1::{JobCondition, JobStatus};

    use super::*;

    fn key(attempt: u32) -> AttemptKey {
        AttemptKey {
            job_id: Uuid::from_u128(7),
            attempt,
        }
    }

    fn running(attempts: &[u32]) -> Tracker {
        let mut tracker = Tracker::default();
        for attempt in attempts {
            tracker.launched(key(*attempt));
        }
        tracker
    }

    fn job_with(conditions: &[(&str, &str, Option<&str>)]) -> Job {
        Job {
            status: Some(JobStatus {
                conditions: Some(
                    conditions
                        .iter()
                        .map(|(kind, status, reason)| JobCondition {
                            type_: (*kind).to_owned(),
                            status: (*status).to_owned(),
                            reason: reason.map(str::to_owned),
                            ..JobCondition::default()
                        })
                        .collect(),
                ),
                ..JobStatus::default()
            }),
            ..Job::default()
        }
    }

    #[test]
    fn only_true_complete_or_failed_conditions_end_a_job() {
        assert_eq!(JobOutcome::of(&Job::default()), JobOutcome::Running);
        // Kubernetes 1.31+ sets these first, while the pods are still terminating.
        let pending = job_with(&[
            ("SuccessCriteriaMet", "True", None),
            ("FailureTarget", "True", Some("DeadlineExceeded")),
        ]);
        assert_eq!(JobOutcome::of(&pending), JobOutcome::Running);
        let suspended_failure = job_with(&[("Failed", "False", Some("BackoffLimitExceeded"))]);
        assert_eq!(JobOutcome::of(&suspended_failure), JobOutcome::Running);
        assert_eq!(
            JobOutcome::of(&job_with(&[("Complete", "True", None)])),
            JobOutcome::Complete
        );
        assert_eq!(
            JobOutcome::of(&job_with(&[("Failed", "True", Some("DeadlineExceeded"))])),
            JobOutcome::Failed("DeadlineExceeded".into())
        );
    }

    #[test]
    fn an_attempt_is_reported_once_however_often_its_job_is_seen() {
        let mut tracker = running(&[1]);
        assert_eq!(tracker.observed(key(1), JobOutcome::Running), None);
        assert_eq!(tracker.running(), 1);

        let ended = tracker.observed(key(1), JobOutcome::Complete);
        assert!(ended.is_some_and(|e| e.clean && e.attempt == 1));
        assert_eq!(tracker.running(), 0);
        assert_eq!(tracker.observed(key(1), JobOutcome::Complete), None);
        assert_eq!(tracker.deleted(key(1), JobOutcome::Complete), None);
    }

    #[test]
    fn a_job_that_ends_before_launch_returns_is_not_counted_as_running() {
        let mut tracker = Tracker::default();
        assert!(
            tracker
                .observed(key(2), JobOutcome::Failed("x".into()))
                .is_some()
        );
        tracker.launched(key(2));
        assert_eq!(tracker.running(), 0);
    }

    #[test]
    fn a_deleted_running_job_ends_its_attempt_and_says_who_deleted_it() {
        let mut tracker = running(&[1, 2]);
        tracker.stopping(key(1));

        let stopped = tracker.deleted(key(1), JobOutcome::Running).expect("ended");
        assert_eq!(
            stopped.detail,
            "Kubernetes Job deleted: stopped by the runner"
        );
        let lost = tracker.deleted(key(2), JobOutcome::Running).expect("ended");
        assert_eq!(lost.detail, "Kubernetes Job deleted before it finished");
        assert!(!lost.clean);
        assert_eq!(tracker.running(), 0);
    }

    #[test]
    fn a_relist_names_the_running_attempts_it_did_not_show() {
        let tracker = running(&[1, 2]);
        let listed = HashSet::from([key(2)]);
        assert_eq!(tracker.missing(&listed), vec![key(1)]);
    }
}
