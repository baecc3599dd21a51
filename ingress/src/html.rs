//! The small pages the ingress answers widget and install calls with. Every value
//! that came from the request is escaped: a `DOMAIN` or `PLACEMENT` is attacker input.

use std::fmt::Write;

/// Escapes text for HTML element content and quoted attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const INSTALL_SCRIPT: &str = "<script>BX24.init(function(){\
var handler=new URL('events',location.href.split('?')[0]).href;\
BX24.callBind('ONAPPINSTALL',handler,0,function(){BX24.installFinish();});});</script>";

fn page(lang: &str, title: &str, body: &str, script: &str) -> String {
    let mut html = String::with_capacity(512 + body.len());
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"{}\"><head><meta charset=\"utf-8\"><title>{}</title>\
         <script src=\"//api.bitrix24.com/api/v1/\"></script></head>\n<body>{}{}</body></html>\n",
        escape(lang),
        escape(title),
        body,
        script
    );
    html
}

/// The widget page: tells the user the item is being fetched.
pub fn placement_page(lang: &str, placement: &str, item_id: Option<u64>, domain: &str) -> String {
    let item = item_id.map(|id| format!(" #{id}")).unwrap_or_default();
    let body = format!(
        "<p>b24-pipeline received <b>{}</b>{} from {}. The data is being fetched.</p>",
        escape(placement),
        item,
        escape(domain)
    );
    page(lang, "b24-pipeline", &body, "")
}

/// The install page. Before finishing the installation it binds `ONAPPINSTALL` to
/// our `/events` (resolved from the page's own address, so a path prefix behind a
/// proxy is kept): that event, sent after `installFinish`, is the only message that
/// carries the portal's `application_token`, without which the worker cannot verify
/// the portal's later events.
pub fn install_page(lang: &str, domain: &str) -> String {
    let body = format!(
        "<p>b24-pipeline is being installed on {}.</p>",
        escape(domain)
    );
    page(lang, "b24-pipeline installation", &body, INSTALL_SCRIPT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_every_special_character() {
        assert_eq!(
            escape(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn pages_echo_nothing_unescaped() {
        let evil = "\"><img src=x onerror=alert(1)>";
        for html in [
            placement_page(evil, evil, Some(5), evil),
            install_page(evil, evil),
        ] {
            assert!(!html.contains("<img"), "{html}");
            assert!(!html.contains("\"><img"), "{html}");
            assert!(html.contains("&quot;&gt;&lt;img"), "{html}");
        }
        let install = install_page("en", "a.bitrix24.com");
        assert!(install.contains("BX24.callBind('ONAPPINSTALL'"));
        assert!(install.contains("BX24.installFinish()"));
    }
}
