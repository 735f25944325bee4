// Precompiled header: everything heavy that most translation units include.
#pragma once
#include <torch/torch.h>
#include <ATen/ATen.h>
#include <algorithm>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>
