//! The one list of what the pipeline handles: the events ([`KnownEvent`]) and the widget
//! placements ([`KnownPlacement`]). Edge validation, the worker's dispatch, metric labels
//! and what an installation binds all read these; adding an event is one variant here
//! plus its handler in the worker.

use std::fmt;

/// An event code we handle. Anything else is recorded as ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnownEvent {
    /// `ONAPPINSTALL`: bound by the install page; brings the `application_token`.
    AppInstall,
    /// `ONAPPUPDATE`: a new version; Bitrix24 removed every binding, so all are set again.
    AppUpdate,
    /// `ONAPPUNINSTALL`: only the `application_token` proves it.
    AppUninstall,
    /// `ONAPPPAYMENT`: carries no token; the worker asks `app.info`.
    AppPayment,
    /// `ONCRMDEALRECURRINGEXPOSE`: a deal created from a recurring template.
    DealRecurringExpose,
    /// `ONCRMREQUISITEADD`: a requisite added.
    RequisiteAdd,
}

impl KnownEvent {
    pub const ALL: [KnownEvent; 6] = [
        Self::AppInstall,
        Self::AppUpdate,
        Self::AppUninstall,
        Self::AppPayment,
        Self::DealRecurringExpose,
        Self::RequisiteAdd,
    ];

    /// The upper-case code Bitrix24 sends (`event` of the POST, `EVENT_NAME` offline).
    pub fn code(self) -> &'static str {
        match self {
            Self::AppInstall => "ONAPPINSTALL",
            Self::AppUpdate => "ONAPPUPDATE",
            Self::AppUninstall => "ONAPPUNINSTALL",
            Self::AppPayment => "ONAPPPAYMENT",
            Self::DealRecurringExpose => "ONCRMDEALRECURRINGEXPOSE",
            Self::RequisiteAdd => "ONCRMREQUISITEADD",
        }
    }

    /// From a code in any letter case (the docs write `onCrmRequisiteAdd`).
    pub fn from_code(code: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|e| e.code().eq_ignore_ascii_case(code.trim()))
    }

    /// Bound online to `<PUBLIC_URL>/events` at installation and after every update.
    /// `ONAPPINSTALL` is bound by the install page itself (the installation is not
    /// finished when the worker binds); binding it again does no harm.
    pub fn bound_online(self) -> bool {
        true
    }

    /// Also bound offline (`event_type=offline`), so a change made while our ingress
    /// was unreachable is recorded by Bitrix24 and reconciled later. Only changes of
    /// data: app lifecycle events mean nothing later (an uninstalled app cannot fetch).
    pub fn bound_offline(self) -> bool {
        matches!(self, Self::DealRecurringExpose | Self::RequisiteAdd)
    }

    /// Its envelope must keep the call's OAuth tokens: the worker proves them with a
    /// refresh (installation, update). Every other event is handled with the stored
    /// tokens, so the ingress drops the event's own before publishing.
    pub fn needs_event_tokens(self) -> bool {
        matches!(self, Self::AppInstall | Self::AppUpdate)
    }

    /// Documented without `auth[member_id]`: the portal is found by its domain.
    pub fn identified_by_domain(self) -> bool {
        matches!(self, Self::AppPayment)
    }

    /// Documented without an `application_token` (`ONAPPPAYMENT`): unauthenticated, so
    /// its handler may cause at most one debounced `app.info` per portal.
    pub fn unauthenticated(self) -> bool {
        matches!(self, Self::AppPayment)
    }

    /// The label of its metrics: its code (a closed set, so bounded).
    pub fn label(self) -> &'static str {
        self.code()
    }
}

impl fmt::Display for KnownEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A CRM detail-card timeline button (`CRM_…_DETAIL_ACTIVITY`) and the CRM item type
/// behind it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KnownPlacement {
    Lead,
    Deal,
    Contact,
    Company,
    Quote,
    SmartInvoice,
    /// `CRM_DYNAMIC_<entityTypeId>_DETAIL_ACTIVITY`: a smart-process type, bound once
    /// per type the portal has.
    Dynamic(u32),
}

impl KnownPlacement {
    /// The placements every portal has; dynamic ones are listed per portal.
    pub const STATIC: [KnownPlacement; 6] = [
        Self::Lead,
        Self::Deal,
        Self::Contact,
        Self::Company,
        Self::Quote,
        Self::SmartInvoice,
    ];

    /// The CRM `entityTypeId` for `crm.item.get`: lead 1, deal 2, contact 3, company 4,
    /// quote 7, smart invoice 31, dynamic N.
    pub fn entity_type_id(self) -> u32 {
        match self {
            Self::Lead => 1,
            Self::Deal => 2,
            Self::Contact => 3,
            Self::Company => 4,
            Self::Quote => 7,
            Self::SmartInvoice => 31,
            Self::Dynamic(n) => n,
        }
    }

    pub fn code(self) -> String {
        match self {
            Self::Lead => "CRM_LEAD_DETAIL_ACTIVITY".into(),
            Self::Deal => "CRM_DEAL_DETAIL_ACTIVITY".into(),
            Self::Contact => "CRM_CONTACT_DETAIL_ACTIVITY".into(),
            Self::Company => "CRM_COMPANY_DETAIL_ACTIVITY".into(),
            Self::Quote => "CRM_QUOTE_DETAIL_ACTIVITY".into(),
            Self::SmartInvoice => "CRM_SMART_INVOICE_DETAIL_ACTIVITY".into(),
            Self::Dynamic(n) => format!("CRM_DYNAMIC_{n}_DETAIL_ACTIVITY"),
        }
    }

    /// From a placement code in any letter case; `None` for placements we do not
    /// handle.
    pub fn from_code(code: &str) -> Option<Self> {
        let code = code.trim().to_ascii_uppercase();
        let middle = code
            .strip_prefix("CRM_")?
            .strip_suffix("_DETAIL_ACTIVITY")?;
        Some(match middle {
            "LEAD" => Self::Lead,
            "DEAL" => Self::Deal,
            "CONTACT" => Self::Contact,
            "COMPANY" => Self::Company,
            "QUOTE" => Self::Quote,
            "SMART_INVOICE" => Self::SmartInvoice,
            _ => {
                let n = middle.strip_prefix("DYNAMIC_")?;
                if n.is_empty() || n.starts_with('0') || !n.bytes().all(|b| b.is_ascii_digit()) {
                    return None;
                }
                Self::Dynamic(n.parse().ok()?)
            }
        })
    }

    /// The metric label: dynamic types grouped, so labels stay bounded.
    pub fn label(self) -> &'static str {
        match self {
            Self::Lead => "CRM_LEAD_DETAIL_ACTIVITY",
            Self::Deal => "CRM_DEAL_DETAIL_ACTIVITY",
            Self::Contact => "CRM_CONTACT_DETAIL_ACTIVITY",
            Self::Company => "CRM_COMPANY_DETAIL_ACTIVITY",
            Self::Quote => "CRM_QUOTE_DETAIL_ACTIVITY",
            Self::SmartInvoice => "CRM_SMART_INVOICE_DETAIL_ACTIVITY",
            Self::Dynamic(_) => "CRM_DYNAMIC_DETAIL_ACTIVITY",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_in_any_case() {
        for e in KnownEvent::ALL {
            assert_eq!(KnownEvent::from_code(e.code()), Some(e));
            assert_eq!(
                KnownEvent::from_code(&e.code().to_ascii_lowercase()),
                Some(e)
            );
        }
        assert_eq!(
            KnownEvent::from_code("onCrmRequisiteAdd"),
            Some(KnownEvent::RequisiteAdd)
        );
        assert_eq!(KnownEvent::from_code("ONCRMCONTACTADD"), None);
    }

    #[test]
    fn placements_map_to_entity_types() {
        for p in KnownPlacement::STATIC {
            assert_eq!(KnownPlacement::from_code(&p.code()), Some(p));
        }
        let got: Vec<u32> = KnownPlacement::STATIC
            .iter()
            .map(|p| p.entity_type_id())
            .collect();
        assert_eq!(got, [1, 2, 3, 4, 7, 31]);
        assert_eq!(
            KnownPlacement::from_code("CRM_DYNAMIC_183_DETAIL_ACTIVITY"),
            Some(KnownPlacement::Dynamic(183))
        );
        assert_eq!(
            KnownPlacement::Dynamic(183).code(),
            "CRM_DYNAMIC_183_DETAIL_ACTIVITY"
        );
        for bad in [
            "CRM_DYNAMIC__DETAIL_ACTIVITY",
            "CRM_DYNAMIC_0183_DETAIL_ACTIVITY",
            "CRM_DYNAMIC_X_DETAIL_ACTIVITY",
            "CRM_DEAL_LIST_MENU",
            "CRM_DYNAMIC_99999999999_DETAIL_ACTIVITY",
        ] {
            assert_eq!(KnownPlacement::from_code(bad), None, "{bad}");
        }
    }
}
