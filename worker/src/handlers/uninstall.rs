//! `ONAPPUNINSTALL`: its auth has only `application_token` (verified by the consumer
//! before this runs). Mark the portal uninstalled and erase its tokens.

use crate::store::Store;

use super::Failure;

pub async fn run(store: &Store, member_id: &str) -> Result<(), Failure> {
    store.uninstall(member_id).await?;
    tracing::info!(member_id, "portal uninstalled; tokens erased");
    Ok(())
}
