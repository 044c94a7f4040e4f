#include "kvstrata/transfer/memory_types.h"

#include <ucp/api/ucp.h>

#include "absl/strings/str_cat.h"

namespace kvstrata::transfer {

absl::StatusOr<bool> UcxSupportsCudaMemory(const std::string& transports) {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) {
    return absl::InternalError(absl::StrCat("ucp_config_read: ", ucs_status_string(status)));
  }
  if (!transports.empty()) ucp_config_modify(config, "TLS", transports.c_str());
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_TAG;
  ucp_context_h context = nullptr;
  status = ucp_init(&params, config, &context);
  ucp_config_release(config);
  if (status != UCS_OK) {
    return absl::InternalError(absl::StrCat("ucp_init: ", ucs_status_string(status)));
  }
  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  status = ucp_context_query(context, &attr);
  ucp_cleanup(context);
  if (status != UCS_OK) {
    return absl::InternalError(absl::StrCat("ucp_context_query: ", ucs_status_string(status)));
  }
  return (attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
}

}  // namespace kvstrata::transfer
